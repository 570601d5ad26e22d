//! The crate's only `unsafe`: thin wrappers over libc calls that `nix` does not offer.
//!
//! Each function keeps its `unsafe` block to the call itself and states why the call is sound.
//! The capability calls act on the calling thread only and are `pub(crate)`: they are steps of
//! [`crate::privdrop`], which runs them in its fixed order, and nothing else may.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Mutex;

/// Caps glibc's malloc at `n` arenas. By default it makes up to eight per core, one for each
/// thread that allocates while the others hold theirs, and keeps what each thread freed in that
/// thread's arena: a long-running service whose short-lived threads (one per sync, one per
/// status client) allocate in bursts then holds several copies of its peak. Measured for the
/// replicator with 10,000 users under a status poller: 89 MiB with the default, 31 MiB with 2.
/// Call it before any thread starts. Returns false if glibc refused.
pub fn limit_malloc_arenas(n: i32) -> bool {
    // SAFETY: mallopt only sets a tunable of the allocator; M_ARENA_MAX takes any positive
    // value, and no thread allocates concurrently when called as documented.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, n) == 1 }
}

/// Fills `buf` from the kernel's random pool (`getrandom(2)`), blocking only until the pool
/// is initialised at boot.
pub fn random_bytes(buf: &mut [u8]) {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the pointer and length describe `rest`, a live, writable byte slice.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // getrandom(2) cannot fail with valid arguments on Linux ≥ 3.17; if it ever does,
            // there is no safe fallback for GUID uniqueness.
            panic!("getrandom failed: {err}");
        }
        filled += n as usize;
    }
}

/// One entry of the passwd database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    /// Login name.
    pub name: String,
    /// UID.
    pub uid: u32,
    /// Primary GID.
    pub gid: u32,
    /// Home directory.
    pub home: String,
}

static PWENT_LOCK: Mutex<()> = Mutex::new(());

/// Every entry of the passwd database through NSS (`setpwent`/`getpwent_r`/`endpwent`).
/// Entries whose name or home is not UTF-8 are skipped.
pub fn all_passwd_entries() -> io::Result<Vec<PasswdEntry>> {
    // getpwent keeps one process-wide cursor; the lock keeps two callers from sharing it.
    let _guard = PWENT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut out = Vec::new();
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: setpwent has no arguments; the cursor is protected by PWENT_LOCK.
    unsafe { libc::setpwent() };
    loop {
        // SAFETY: all-zero is a valid `passwd` (null pointers, zero ids); it is only read
        // after getpwent_r fills it.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer refers to a live local; `buf.len()` is its real length.
        let rc = unsafe { libc::getpwent_r(&mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
        if rc == libc::ERANGE {
            let len = buf.len() * 2;
            buf.resize(len, 0);
            continue;
        }
        if rc != 0 || result.is_null() {
            break;
        }
        // SAFETY: on success pw_name and pw_dir point to NUL-terminated strings inside `buf`,
        // which lives until the end of this iteration.
        let (name, home) = unsafe { (CStr::from_ptr(pwd.pw_name), CStr::from_ptr(pwd.pw_dir)) };
        if let (Ok(name), Ok(home)) = (name.to_str(), home.to_str()) {
            out.push(PasswdEntry { name: name.to_owned(), uid: pwd.pw_uid, gid: pwd.pw_gid, home: home.to_owned() });
        }
    }
    // SAFETY: no arguments; still under PWENT_LOCK.
    unsafe { libc::endpwent() };
    Ok(out)
}

/// Starts writing back a file's dirty pages without waiting (`sync_file_range(2)` with
/// `SYNC_FILE_RANGE_WRITE`), so that a later `fdatasync` of many files finds most of the work
/// done. Purely an optimisation: errors are ignored, durability still comes from fsync.
pub fn start_writeback(fd: BorrowedFd<'_>) {
    // SAFETY: `fd` is a valid open descriptor for the duration of the borrow; the call only
    // schedules I/O and touches no memory of ours.
    let _ = unsafe { libc::sync_file_range(fd.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}

/// Marks every file descriptor from `first` on close-on-exec, so that no child process
/// started later inherits one this process was handed by whoever started it
/// (`close_range(2)` with `CLOSE_RANGE_CLOEXEC`, Linux ≥ 5.11; on older kernels, each fd
/// listed in `/proc/self/fd` in turn).
pub fn cloexec_from(first: u32) -> io::Result<()> {
    // SAFETY: the call only sets a flag on descriptors and touches no memory of ours.
    let rc = unsafe { libc::close_range(first, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as libc::c_int) };
    if rc == 0 {
        return Ok(());
    }
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd >= first as i32)
        .collect();
    for fd in fds {
        // SAFETY: F_GETFD/F_SETFD on a number only read or set its flags; a number that is
        // no longer open (the directory's own fd, closed by now) fails with EBADF, ignored.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags >= 0 && unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Formats a Unix time as `YYYY-MM-DD HH:MM:SS` in the local time zone (`localtime_r`), the
/// way doveadm prints dates.
pub fn format_local_time(t: i64) -> String {
    // SAFETY: all-zero is a valid `tm` (plain integers and a null zone pointer).
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let tt: libc::time_t = t;
    // SAFETY: both pointers refer to live locals; localtime_r is the thread-safe variant.
    let ok = unsafe { !libc::localtime_r(&tt, &mut tm).is_null() };
    if !ok {
        return t.to_string();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// Clears this thread's ambient capability set (`PR_CAP_AMBIENT_CLEAR_ALL`).
pub(crate) fn clear_ambient_caps() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only; no memory is passed.
    let rc = unsafe {
        libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0 as libc::c_ulong, 0, 0)
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Drops capability `cap` (a number, so that capabilities newer than the `caps` crate are
/// dropped too) from this thread's bounding set (`PR_CAPBSET_DROP`; needs CAP_SETPCAP, so it
/// must run while still root).
pub(crate) fn drop_bounding_cap(cap: u32) -> io::Result<()> {
    // SAFETY: prctl with integer arguments only; no memory is passed.
    let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0 as libc::c_ulong, 0, 0) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Whether capability `cap` is still in this thread's bounding set (`PR_CAPBSET_READ`).
pub(crate) fn bounding_cap_present(cap: u32) -> io::Result<bool> {
    // SAFETY: prctl with integer arguments only; no memory is passed.
    let rc = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0 as libc::c_ulong, 0, 0) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc == 1) }
}

/// `fanotify_init(2)`: a new fanotify group.
pub fn fanotify_init(flags: u32, event_f_flags: u32) -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: no pointers are passed; on success the descriptor is new and ours alone.
    let fd = unsafe { libc::fanotify_init(flags, event_f_flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// `fanotify_mark(2)` on `path` (not followed if it is a symlink only when `flags` says so).
pub fn fanotify_mark(group: BorrowedFd<'_>, flags: u32, mask: u64, path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: `group` is a live descriptor for the call; `c` is NUL-terminated and outlives it.
    let r = unsafe { libc::fanotify_mark(group.as_raw_fd(), flags, mask, libc::AT_FDCWD, c.as_ptr()) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// The largest file handle the kernel makes (`MAX_HANDLE_SZ`).
pub const MAX_HANDLE_BYTES: usize = 128;

/// `open_by_handle_at(2)` with `O_PATH`: the object a file handle (from fanotify) names, on
/// the filesystem of `mount`. Needs `CAP_DAC_READ_SEARCH`. Nothing is read or followed: an
/// `O_PATH` descriptor only names the object.
pub fn open_by_handle(mount: BorrowedFd<'_>, handle_type: i32, handle: &[u8]) -> io::Result<std::os::fd::OwnedFd> {
    if handle.len() > MAX_HANDLE_BYTES {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // `struct file_handle`: u32 handle_bytes, i32 handle_type, then the bytes; built in u32s
    // so that it is aligned as the struct is.
    let mut buf: Vec<u32> = Vec::with_capacity(2 + handle.len().div_ceil(4));
    buf.push(handle.len() as u32);
    buf.push(handle_type as u32);
    for chunk in handle.chunks(4) {
        let mut b = [0u8; 4];
        b[..chunk.len()].copy_from_slice(chunk);
        buf.push(u32::from_ne_bytes(b));
    }
    // SAFETY: `buf` is a complete, 4-aligned `struct file_handle` whose `handle_bytes` bytes
    // follow its header within the allocation; it lives for the call.
    let fd =
        unsafe { libc::open_by_handle_at(mount.as_raw_fd(), buf.as_mut_ptr().cast(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// The filesystem id of `path` (`statfs(2)`'s `f_fsid`), as fanotify reports it in events.
pub fn filesystem_id(path: &std::path::Path) -> io::Result<[i32; 2]> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `c` is NUL-terminated; `st` is writable and the kernel fills it on success.
    if unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statfs succeeded, so `st` is initialised.
    let st = unsafe { st.assume_init() };
    // SAFETY: `fsid_t` is a `repr(C)` struct of two `c_int` (its field is private in libc).
    Ok(unsafe { std::mem::transmute::<libc::fsid_t, [i32; 2]>(st.f_fsid) })
}

/// A new file without a name (`O_TMPFILE`) in `dir`, readable and writable by this process
/// alone: for data too large for memory that must vanish with the process.
pub fn unnamed_file(dir: &std::path::Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .open(dir)
}

/// Gives `len` bytes of `file` at `off` back to the file system, keeping the file's size.
/// Best effort: a file system without hole punching keeps the blocks until the file closes.
pub fn punch_hole(file: &std::fs::File, off: u64, len: usize) {
    use nix::fcntl::FallocateFlags as F;
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else { return };
    let _ = nix::fcntl::fallocate(file, F::FALLOC_FL_PUNCH_HOLE | F::FALLOC_FL_KEEP_SIZE, off, len);
}

/// A vector of plain `Copy` values kept in an unlinked file of `dir`, mapped shared into
/// memory: the store's per-mail lists of a very large mailbox, which would otherwise hold
/// tens of megabytes of heap for the whole sync (see [`crate::spill`]). The kernel keeps the
/// pages in its page cache, writes them back and evicts them under pressure like any file;
/// [`FileVec::release`] drops them from this process's mappings, so that its resident size
/// is what it touched since, not the whole list.
///
/// The file has no name (`O_TMPFILE`): nothing is left behind by a crash, and no other
/// process can open it except through `/proc/PID/fd` (root or the same user, who could as
/// well write into our memory). Its blocks are allocated (`fallocate`) before they are
/// mapped, so a full disk or quota fails the growth with an error, never a `SIGBUS` on a
/// write. Elements `[0, len)` were each written as a `T` by this value, which is what makes
/// reading them back as `T` sound.
pub struct FileVec<T: Copy> {
    file: std::fs::File,
    ptr: std::ptr::NonNull<T>,
    cap: usize,
    len: usize,
}

// SAFETY: a FileVec owns its mapping exclusively, as a Vec owns its buffer.
unsafe impl<T: Copy + Send> Send for FileVec<T> {}
// SAFETY: shared access only reads, as for a Vec; `release` changes no element's value.
unsafe impl<T: Copy + Sync> Sync for FileVec<T> {}

impl<T: Copy> FileVec<T> {
    const SIZE: usize = {
        assert!(std::mem::size_of::<T>() > 0 && std::mem::align_of::<T>() <= 4096);
        std::mem::size_of::<T>()
    };

    /// An empty vector with room for `cap` elements in a new unlinked file of `dir`.
    pub fn create(dir: &std::path::Path, cap: usize) -> io::Result<Self> {
        let file = unnamed_file(dir)?;
        let cap = cap.max(1);
        let bytes = Self::bytes_for(cap)?;
        nix::fcntl::fallocate(&file, nix::fcntl::FallocateFlags::empty(), 0, bytes as libc::off_t)?;
        // SAFETY: a new shared mapping of `bytes` bytes of a file this value alone holds; the
        // kernel chooses the address, so no memory of ours is replaced.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Self { file, ptr, cap, len: 0 })
    }

    fn bytes_for(cap: usize) -> io::Result<usize> {
        cap.checked_mul(Self::SIZE)
            .filter(|&b| b <= isize::MAX as usize)
            .ok_or_else(|| io::Error::other("vector too large"))
    }

    /// How many elements it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when it holds none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many elements fit before [`FileVec::grow_to`] is needed.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Makes room for `cap` elements in all (never shrinks).
    pub fn grow_to(&mut self, cap: usize) -> io::Result<()> {
        if cap <= self.cap {
            return Ok(());
        }
        let (old, new) = (Self::bytes_for(self.cap)?, Self::bytes_for(cap)?);
        nix::fcntl::fallocate(&self.file, nix::fcntl::FallocateFlags::empty(), 0, new as libc::off_t)?;
        // SAFETY: `ptr`/`old` is exactly our mapping, and the file now has `new` bytes; the
        // kernel may move the mapping, and we take the address it returns. No reference into
        // the old mapping outlives this `&mut self` call.
        let p = unsafe { libc::mremap(self.ptr.as_ptr().cast(), old, new, libc::MREMAP_MAYMOVE) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        self.ptr = std::ptr::NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mremap returned NULL"))?;
        self.cap = cap;
        Ok(())
    }

    /// Appends `v`; the caller has made room ([`FileVec::grow_to`]). Returns false if full.
    pub fn push(&mut self, v: T) -> bool {
        if self.len == self.cap {
            return false;
        }
        // SAFETY: `len < cap`, so the slot lies inside our mapping, which is writable and
        // aligned (page-aligned base, a whole number of `T` before it).
        unsafe { self.ptr.as_ptr().add(self.len).write(v) };
        self.len += 1;
        true
    }

    /// Keeps the first `len` elements.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// The elements.
    pub fn as_slice(&self) -> &[T] {
        // SAFETY: elements `[0, len)` lie in our mapping and were each written as a `T`
        // (`push`, or through `as_mut_slice`); the mapping lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The elements, to change in place.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Drops the pages from this process's mappings (`MADV_DONTNEED`). The data stays in the
    /// file (the page cache): the next access faults the same bytes back in.
    pub fn release(&self) {
        let bytes = self.cap * Self::SIZE;
        // SAFETY: the range is exactly our shared file mapping; for such a mapping
        // MADV_DONTNEED only unmaps pages, whose contents stay in the file and come back on
        // the next access, so no value anyone may be reading changes.
        let _ = unsafe { libc::madvise(self.ptr.as_ptr().cast(), bytes, libc::MADV_DONTNEED) };
    }
}

impl<T: Copy> Drop for FileVec<T> {
    fn drop(&mut self) {
        // SAFETY: our own mapping, of exactly this size; no reference into it outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.cap * Self::SIZE) };
    }
}

impl<T: Copy> std::fmt::Debug for FileVec<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FileVec(len {}, cap {})", self.len, self.cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_vec_keeps_its_values_across_growth_and_release() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = FileVec::<(u32, u64, bool)>::create(dir.path(), 3).unwrap();
        for i in 0..100_000u32 {
            if !v.push((i, u64::from(i) * 7, i % 3 == 0)) {
                v.grow_to(v.capacity() * 2).unwrap();
                assert!(v.push((i, u64::from(i) * 7, i % 3 == 0)));
            }
            if i % 10_000 == 0 {
                v.release();
            }
        }
        v.as_mut_slice()[5].1 = 1;
        v.release();
        assert_eq!(v.len(), 100_000);
        assert!(v.as_slice().iter().enumerate().all(|(i, e)| e.0 == i as u32 && (i == 5 || e.1 == i as u64 * 7)));
        assert_eq!(v.as_slice()[5], (5, 1, false));
        v.truncate(10);
        assert_eq!(v.as_slice().len(), 10);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the file has no name");
    }

    #[test]
    fn random_is_not_constant() {
        let mut a = [0u8; 16];
        let mut b = [0u8; 16];
        random_bytes(&mut a);
        random_bytes(&mut b);
        assert_ne!(a, b);
    }

    #[test]
    fn passwd_has_root() {
        let all = all_passwd_entries().unwrap();
        assert!(all.iter().any(|e| e.name == "root" && e.uid == 0));
    }
}

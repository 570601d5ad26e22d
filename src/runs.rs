//! Runs: append-only sequences of variable-length records, in one unnamed file.
//!
//! A join too large for memory (the open of a Maildir with a million files, which matches the
//! directories against the uidlist: see `store::maildir::scan`) splits its inputs into
//! partitions small enough to join in memory, one after the other, and writes each partition
//! as a run. A run is read back in the order it was written. Each run being written has a
//! buffer; a full buffer goes to the end of the file in one `pwrite`, and is read back in one
//! `pread`. All the I/O is in large sequential pieces, the data stays in the kernel's page
//! cache, and what the process holds is its buffers, whatever the size of the runs.
//!
//! The file is made like [`crate::spill`]'s: without a name (`O_TMPFILE`), in the mailbox's
//! own directory, so a crash leaves nothing behind. A run that has been read is punched out
//! of the file. When the file cannot be made, or a write fails (a full disk, a quota), the
//! chunks stay in memory: slower to bound, never wrong.

use std::fs::File;
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use crate::spill::{self, SpillVec};

/// A partition holds at least this many bytes of records, whatever the spill threshold (the
/// tests set it to 0 to send every join through the partitions).
const MIN_PART: usize = 1024;
/// At most this many partitions: with the 4 MiB threshold, that is some 80 million file names
/// before a partition grows past it (a mailbox's names stop at 4 GiB before that).
const MAX_PARTS: usize = 1024;
/// What the buffers of the runs being written hold at most, all together.
const BUFFERS: usize = 4 << 20;

/// How a join too large for memory is split: into `parts` partitions by a keyed hash of each
/// record's key (keyed, so that no set of keys can be made to fall into one partition), each
/// small enough to join in memory, and the size of the buffers its runs are written with.
pub(crate) struct Partitions {
    pub(crate) parts: usize,
    pub(crate) chunk: usize,
    keys: RandomState,
}

impl Partitions {
    /// For `bytes` of records: partitions of about `budget` bytes, at least `least` of them,
    /// `writing` runs of each partition being written at once.
    pub(crate) fn new(bytes: usize, budget: usize, least: usize, writing: usize) -> Self {
        let parts = bytes.div_ceil(budget.max(MIN_PART)).clamp(least, MAX_PARTS);
        let chunk = (BUFFERS / (writing.max(1) * parts)).clamp(4 << 10, 256 << 10);
        Self { parts, chunk, keys: RandomState::new() }
    }

    /// The partition of `key`.
    pub(crate) fn of(&self, key: &str) -> usize {
        ((u128::from(self.keys.hash_one(key)) * self.parts as u128) >> 64) as usize
    }
}

/// Runs of records in one file (see the module's documentation).
pub(crate) struct Runs {
    file: Option<File>,
    /// Where the next chunk goes in `file`.
    end: u64,
    /// A run's buffer is written out once it would pass this many bytes.
    chunk: usize,
    runs: Vec<Run>,
}

#[derive(Default)]
struct Run {
    chunks: Vec<Chunk>,
    /// Records not yet written out.
    buf: Vec<u8>,
}

enum Chunk {
    File { off: u64, len: usize },
    Mem(Vec<u8>),
}

/// Bytes of a record's length prefix.
const PREFIX: usize = 4;

impl Runs {
    /// `runs` empty runs, in a new file of `dir` (`None`: in memory), each written out in
    /// chunks of about `chunk` bytes.
    pub(crate) fn new(dir: Option<&Path>, runs: usize, chunk: usize) -> Self {
        let file = dir.and_then(|d| match crate::sys::unnamed_file(d) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::debug!(dir = %d.display(), error = %e, "runs of a large join stay in memory");
                None
            }
        });
        Self { file, end: 0, chunk: chunk.max(PREFIX), runs: (0..runs).map(|_| Run::default()).collect() }
    }

    /// True when the runs go to a file (for tests).
    #[cfg(test)]
    pub(crate) fn in_file(&self) -> bool {
        self.file.is_some()
    }

    /// Appends one record, the concatenation of `parts`, to run `run`. A record is at most
    /// 4 GiB, far above any caller's (a file name and a few numbers).
    pub(crate) fn push(&mut self, run: usize, parts: &[&[u8]]) {
        let n: usize = parts.iter().map(|p| p.len()).sum();
        let len = u32::try_from(n).expect("a record of a run is small");
        if !self.runs[run].buf.is_empty() && self.runs[run].buf.len() + PREFIX + n > self.chunk {
            self.flush(run);
        }
        let r = &mut self.runs[run];
        if r.buf.capacity() == 0 {
            r.buf.reserve_exact(self.chunk.max(PREFIX + n));
        }
        r.buf.extend_from_slice(&len.to_le_bytes());
        for p in parts {
            r.buf.extend_from_slice(p);
        }
    }

    /// Writes out run `run`'s buffer as one chunk (or keeps it in memory if that fails).
    fn flush(&mut self, run: usize) {
        let buf = std::mem::take(&mut self.runs[run].buf);
        if buf.is_empty() {
            return;
        }
        let chunk = match &self.file {
            Some(f) => match f.write_all_at(&buf, self.end) {
                Ok(()) => {
                    let c = Chunk::File { off: self.end, len: buf.len() };
                    self.end += buf.len() as u64;
                    // The buffer is reused for the next chunk.
                    let mut buf = buf;
                    buf.clear();
                    self.runs[run].buf = buf;
                    c
                }
                Err(e) => {
                    tracing::debug!(error = %e, "a chunk of a large join stays in memory");
                    Chunk::Mem(buf)
                }
            },
            None => Chunk::Mem(buf),
        };
        self.runs[run].chunks.push(chunk);
    }

    /// Adds an empty run at the end and returns its number.
    pub(crate) fn add_run(&mut self) -> usize {
        self.runs.push(Run::default());
        self.runs.len() - 1
    }

    /// How many runs there are.
    pub(crate) fn len(&self) -> usize {
        self.runs.len()
    }

    /// Ends writing run `run`: its buffer is written out and freed.
    pub(crate) fn finish(&mut self, run: usize) {
        self.flush(run);
        self.runs[run].buf = Vec::new();
    }

    /// Reads run `run` from its start. Records still in its buffer are read last.
    pub(crate) fn reader(&self, run: usize) -> RunReader<'_> {
        let r = &self.runs[run];
        RunReader {
            file: self.file.as_ref(),
            chunks: &r.chunks,
            tail: &r.buf,
            next: 0,
            own: Vec::new(),
            in_own: false,
            data_len: 0,
            borrowed: &[],
            pos: 0,
            rec: None,
        }
    }

    /// Drops run `run`'s records and gives its part of the file back to the file system.
    pub(crate) fn clear(&mut self, run: usize) {
        let r = std::mem::take(&mut self.runs[run]);
        if let Some(f) = &self.file {
            for c in &r.chunks {
                if let Chunk::File { off, len } = *c {
                    crate::sys::punch_hole(f, off, len);
                }
            }
        }
    }
}

/// Reads one run's records in order: [`RunReader::next`] gives each.
pub(crate) struct RunReader<'a> {
    file: Option<&'a File>,
    chunks: &'a [Chunk],
    tail: &'a [u8],
    /// The next chunk to load (`chunks.len()`: the tail).
    next: usize,
    /// A chunk read from the file.
    own: Vec<u8>,
    in_own: bool,
    data_len: usize,
    /// A chunk in memory, or the tail.
    borrowed: &'a [u8],
    pos: usize,
    /// The current record: (start, end) in the current chunk.
    rec: Option<(usize, usize)>,
}

impl RunReader<'_> {
    fn data(&self) -> &[u8] {
        if self.in_own { &self.own[..self.data_len] } else { self.borrowed }
    }

    /// Loads the next chunk; false at the end of the run.
    fn load(&mut self) -> io::Result<bool> {
        self.pos = 0;
        if self.next < self.chunks.len() {
            match &self.chunks[self.next] {
                Chunk::File { off, len } => {
                    let f = self.file.ok_or_else(|| io::Error::other("a run's file is gone"))?;
                    if self.own.len() < *len {
                        self.own.resize(*len, 0);
                    }
                    f.read_exact_at(&mut self.own[..*len], *off)?;
                    self.in_own = true;
                    self.data_len = *len;
                }
                Chunk::Mem(v) => {
                    self.in_own = false;
                    self.borrowed = v;
                }
            }
            self.next += 1;
            Ok(true)
        } else if self.next == self.chunks.len() {
            self.in_own = false;
            self.borrowed = self.tail;
            self.next += 1;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// Moves to the next record; false at the end of the run.
    pub(crate) fn advance(&mut self) -> io::Result<bool> {
        loop {
            let data = self.data();
            if self.pos + PREFIX <= data.len() {
                let mut len = [0u8; PREFIX];
                len.copy_from_slice(&data[self.pos..self.pos + PREFIX]);
                let start = self.pos + PREFIX;
                let end = start + u32::from_le_bytes(len) as usize;
                if end > data.len() {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "a run's record is cut short"));
                }
                self.pos = end;
                self.rec = Some((start, end));
                return Ok(true);
            }
            if self.pos != data.len() {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "a run's record is cut short"));
            }
            if !self.load()? {
                self.rec = None;
                return Ok(false);
            }
        }
    }

    /// The current record (after an [`RunReader::advance`] that returned true).
    pub(crate) fn current(&self) -> Option<&[u8]> {
        self.rec.map(|(s, e)| &self.data()[s..e])
    }

    /// The next record, or `None` at the end of the run.
    pub(crate) fn next(&mut self) -> io::Result<Option<&[u8]>> {
        Ok(if self.advance()? { self.current() } else { None })
    }
}

/// Merges sorted runs: calls `each` with every record of `readers`, smallest first by `cmp`
/// (each run must be in `cmp`'s order already); `io_err` turns a read error into `each`'s.
/// A heap of the runs' current records: `n` records of `k` runs cost `n log k` comparisons.
pub(crate) fn merge<E>(
    readers: &mut [RunReader<'_>],
    cmp: impl Fn(&[u8], &[u8]) -> std::cmp::Ordering,
    mut each: impl FnMut(&[u8]) -> Result<(), E>,
    io_err: impl Fn(io::Error) -> E,
) -> Result<(), E> {
    let mut heap: Vec<usize> = Vec::with_capacity(readers.len());
    for (i, r) in readers.iter_mut().enumerate() {
        if r.advance().map_err(&io_err)? {
            heap.push(i);
        }
    }
    let less = |readers: &[RunReader<'_>], a: usize, b: usize| {
        let (x, y) = (readers[a].current().unwrap_or_default(), readers[b].current().unwrap_or_default());
        cmp(x, y).then(a.cmp(&b)).is_lt()
    };
    let sift_down = |readers: &[RunReader<'_>], heap: &mut [usize], mut i: usize| {
        loop {
            let (l, r) = (2 * i + 1, 2 * i + 2);
            let mut m = i;
            if l < heap.len() && less(readers, heap[l], heap[m]) {
                m = l;
            }
            if r < heap.len() && less(readers, heap[r], heap[m]) {
                m = r;
            }
            if m == i {
                return;
            }
            heap.swap(i, m);
            i = m;
        }
    };
    for i in (0..heap.len() / 2).rev() {
        sift_down(readers, &mut heap, i);
    }
    while let Some(&top) = heap.first() {
        each(readers[top].current().unwrap_or_default())?;
        if !readers[top].advance().map_err(&io_err)? {
            let last = heap.len() - 1;
            heap.swap(0, last);
            heap.pop();
        }
        sift_down(readers, &mut heap, 0);
    }
    Ok(())
}

/// Pairs sorted in memory at a time (a quarter of the spill threshold), at least.
const SORT_PIECE_MIN: usize = 1024;

/// `items` sorted, in a list that moves into a file of `dir` once large (see
/// [`crate::spill`]). What a sort holds on the heap is bounded whatever the count: pieces of
/// a quarter of the spill threshold are sorted in memory, written as runs, and merged. The
/// importer sorts its new mails by UID with this, and looks mails up by a GUID's hash.
pub(crate) fn sort_pairs(
    dir: Option<Arc<Path>>,
    items: impl IntoIterator<Item = [u32; 2]>,
) -> io::Result<SpillVec<[u32; 2]>> {
    let piece = (spill::threshold() / 4 / size_of::<[u32; 2]>()).max(SORT_PIECE_MIN);
    let mut out = SpillVec::new_in(dir.clone());
    let mut buf: Vec<[u32; 2]> = Vec::new();
    let mut runs: Option<Runs> = None;
    let write = |runs: &mut Runs, buf: &mut Vec<[u32; 2]>| {
        buf.sort_unstable();
        let run = runs.add_run();
        for p in buf.iter() {
            runs.push(run, &[&p[0].to_le_bytes(), &p[1].to_le_bytes()]);
        }
        runs.finish(run);
        buf.clear();
    };
    for item in items {
        if buf.len() == piece {
            write(runs.get_or_insert_with(|| Runs::new(dir.as_deref(), 0, 64 << 10)), &mut buf);
        }
        buf.push(item);
    }
    let Some(mut runs) = runs else {
        buf.sort_unstable();
        out.reserve_exact(buf.len());
        out.extend_from_slice(&buf);
        return Ok(out);
    };
    if !buf.is_empty() {
        write(&mut runs, &mut buf);
    }
    drop(buf);
    let pair = |rec: &[u8]| -> [u32; 2] {
        let n = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap_or_default());
        if rec.len() == 8 { [n(&rec[..4]), n(&rec[4..])] } else { [0, 0] }
    };
    let mut readers: Vec<_> = (0..runs.len()).map(|r| runs.reader(r)).collect();
    merge(
        &mut readers,
        |a, b| pair(a).cmp(&pair(b)),
        |rec| {
            if rec.len() != 8 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "a sorted run's record is damaged"));
            }
            out.push(pair(rec));
            Ok(())
        },
        |e| e,
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_pairs_come_out_in_order_from_one_piece_or_many() {
        let d = tempfile::tempdir().unwrap();
        // The unit tests' threshold is 0: pieces of SORT_PIECE_MIN pairs.
        for n in [0usize, 1, 5, SORT_PIECE_MIN, SORT_PIECE_MIN + 1, 10 * SORT_PIECE_MIN + 17] {
            for dir in [spill::dir(d.path()), None] {
                let mut x = n as u64 + 99;
                let items: Vec<[u32; 2]> = (0..n)
                    .map(|i| {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        // Many equal first elements.
                        [(x >> 54) as u32, i as u32]
                    })
                    .collect();
                let mut want = items.clone();
                want.sort_unstable();
                let got = sort_pairs(dir.clone(), items).unwrap();
                assert_eq!(got.to_vec(), want, "{n} pairs, in a file: {}", dir.is_some());
                assert_eq!(got.in_file(), dir.is_some() && n > 0, "{n} pairs");
            }
        }
    }

    fn read_all(runs: &Runs, run: usize) -> Vec<Vec<u8>> {
        let mut r = runs.reader(run);
        let mut out = Vec::new();
        while let Some(rec) = r.next().unwrap() {
            out.push(rec.to_vec());
        }
        out
    }

    #[test]
    fn runs_give_back_their_records_in_order_from_file_and_memory() {
        let d = tempfile::tempdir().unwrap();
        for dir in [Some(d.path()), None] {
            let mut runs = Runs::new(dir, 3, 64);
            assert_eq!(runs.in_file(), dir.is_some());
            let mut want: Vec<Vec<Vec<u8>>> = vec![Vec::new(); 3];
            for i in 0..2000u32 {
                let run = (i % 7 % 3) as usize;
                // Records from empty to larger than a chunk.
                let rec: Vec<u8> = (0..(i % 150)).map(|j| (i + j) as u8).collect();
                runs.push(run, &[&i.to_le_bytes(), &rec]);
                let mut whole = i.to_le_bytes().to_vec();
                whole.extend_from_slice(&rec);
                want[run].push(whole);
            }
            // One run read while still being written, the others finished.
            runs.finish(1);
            runs.finish(2);
            for (run, want) in want.iter().enumerate() {
                assert_eq!(&read_all(&runs, run), want, "run {run}");
            }
            runs.clear(1);
            assert!(read_all(&runs, 1).is_empty());
            assert_eq!(read_all(&runs, 2), want[2], "a cleared run leaves the others whole");
        }
    }

    #[test]
    fn merge_gives_every_record_of_sorted_runs_in_order() {
        let d = tempfile::tempdir().unwrap();
        let mut runs = Runs::new(Some(d.path()), 5, 100);
        let mut all = Vec::new();
        let mut x = 12345u64;
        for run in 0..4 {
            let mut v: Vec<u64> = (0..500)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    x >> 40
                })
                .collect();
            v.sort();
            for n in &v {
                runs.push(run, &[&n.to_be_bytes()]);
            }
            all.extend(v);
        }
        // Run 4 stays empty.
        for run in 0..5 {
            runs.finish(run);
        }
        all.sort();
        let mut readers: Vec<_> = (0..5).map(|r| runs.reader(r)).collect();
        let mut got = Vec::new();
        let each = |rec: &[u8]| {
            got.push(u64::from_be_bytes(rec.try_into().unwrap()));
            Ok::<(), io::Error>(())
        };
        merge(&mut readers, |a, b| a.cmp(b), each, |e| e).unwrap();
        assert_eq!(got, all);
    }
}

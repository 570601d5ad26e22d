//! Moving bytes between a dsync connection and a pair of byte streams (stdin/stdout, a pipe, an
//! SSH channel) without ever letting one direction wait for the other.
//!
//! dsync is not request/response: both sides write whenever they have something to say, mail
//! bodies in both directions at once. Two of our brains (or one of ours and Dovecot) deadlock
//! as soon as both block in `write(2)` on full pipes while neither reads. So:
//!
//! ```text
//!   input  ─► reader thread ─► [in queue ≤ IN_LIMIT] ─► brain: try_read / read_blocking
//!   brain: queue_bytes / queue_body ─► [out queue, soft limit] ─► writer thread ─► output
//!                                                  (bodies are read and dot-stuffed here)
//! ```
//!
//! * The brain never blocks on sending: it queues bytes and bodies and asks
//!   [`Transport::queue_full`] before sending more in bulk (Dovecot's
//!   `dsync_ibc_is_send_queue_full`). A mail body is handed over as a reader; the writer
//!   thread streams it, so a body in flight never holds the brain, and the brain can keep
//!   reading (and saving) the peer's bodies meanwhile.
//! * The reader thread keeps reading until its queue holds [`IN_LIMIT`] bytes, then stops
//!   reading until the brain catches up: memory stays bounded whatever the peer sends.
//! * Every wait has the session's stall timeout (`dsync-server -T`): no input for that long
//!   while the brain waits for some, or queued output that the peer has not taken for that
//!   long, ends the session with [`io::ErrorKind::TimedOut`]. Like Dovecot's, the clock
//!   counts from the last sign of life on either side: a read, a write, or the brain starting
//!   to wait. A master sending a large mailbox hears nothing from the peer until the peer has
//!   saved it all (ten minutes for 2,000,000 mails), and a brain busy for longer than the
//!   timeout while the peer's bytes sat in the pipe has not seen the peer stall either.
//!   Nothing ever joins a thread that may be stuck in `read(2)` or `write(2)`: a session that
//!   failed returns at once, and the process (or the next session) is not held by a peer that
//!   stopped reading.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::wire::DotEncoder;

/// Size of one read from the input, and of one body chunk read by the writer.
const CHUNK: usize = 64 * 1024;
/// Input bytes the reader thread may queue ahead of the brain: enough to keep it busy while
/// the brain saves (sixteen reads), little enough not to count in its memory.
pub(crate) const IN_LIMIT: usize = 1 << 20;
/// Queued output bytes above which bulk senders pause ([`Transport::queue_full`]). Dovecot
/// throttles at 128 KiB; a little more keeps pipes busy between the brain's turns.
pub(crate) const OUT_LIMIT: usize = 1 << 20;
/// Mail bodies that may be queued at once (each holds an open mail file).
pub(crate) const MAX_BODIES: usize = 8;

/// Something queued for the peer.
pub(crate) enum OutItem {
    /// Encoded records.
    Bytes(Vec<u8>),
    /// A mail body: read to the end, dot-stuffed by the encoder (already opened by the
    /// record line before it), then terminated.
    Body(Box<dyn Read + Send>, DotEncoder),
}

/// The byte transport under a [`super::stream::WireIbc`]: threads over real streams
/// ([`ThreadedIo`]), or a fixed input for tests and fuzzing ([`MemoryIo`]).
pub(crate) trait Transport {
    /// Input that has arrived, without waiting: `Some(empty)` at the end of input (repeated),
    /// `None` when nothing is there yet.
    fn try_read(&mut self) -> io::Result<Option<Vec<u8>>>;
    /// Input, waiting up to the stall timeout for it; empty at the end of input.
    fn read_blocking(&mut self) -> io::Result<Vec<u8>>;
    /// Queues output. Never blocks.
    fn queue(&mut self, item: OutItem) -> io::Result<()>;
    /// True when bulk senders should pause until the writer catches up.
    fn queue_full(&mut self) -> bool;
    /// Waits until input has arrived, or the queue that [`Transport::queue_full`] reported full
    /// has room again; an error if the connection stalled or failed.
    fn wait(&mut self) -> io::Result<()>;
    /// Ends our output once everything queued was written, waiting at most the stall timeout.
    fn finish(&mut self) -> io::Result<()>;
}

enum InEnd {
    Eof,
    Error(io::ErrorKind, String),
}

#[derive(Default)]
struct Shared {
    input: VecDeque<Vec<u8>>,
    in_bytes: usize,
    in_end: Option<InEnd>,
    last_input: Option<Instant>,
    output: VecDeque<OutItem>,
    out_bytes: usize,
    out_bodies: usize,
    /// When the writer last made progress, or the queue last became non-empty.
    last_output: Option<Instant>,
    /// No more output will be queued: the writer ends when the queue is empty.
    out_closed: bool,
    writer_done: bool,
    writer_error: Option<(io::ErrorKind, String)>,
    /// The brain side was dropped: threads stop as soon as they wake up.
    gone: bool,
}

impl Shared {
    fn is_full(&self) -> bool {
        self.out_bytes >= OUT_LIMIT || self.out_bodies >= MAX_BODIES
    }
}

struct Inner {
    state: Mutex<Shared>,
    cv: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panicking thread poisons the lock; the data is still consistent enough to report
        // errors and shut down.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A connection's byte pipes, served by one reader and one writer thread.
pub(crate) struct ThreadedIo {
    inner: Arc<Inner>,
    timeout: Duration,
    /// [`Transport::queue_full`] said yes since the last [`Transport::wait`].
    full_seen: bool,
}

fn stalled(what: &str, timeout: Duration) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("I/O has stalled: {what} for {} s", timeout.as_secs()))
}

impl ThreadedIo {
    /// Starts the reader and writer threads. `timeout` bounds a stall in either direction.
    pub(crate) fn start<R, W>(input: R, output: W, timeout: Duration) -> io::Result<Self>
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        let now = Instant::now();
        let inner = Arc::new(Inner {
            state: Mutex::new(Shared { last_input: Some(now), last_output: Some(now), ..Default::default() }),
            cv: Condvar::new(),
        });
        let r = Arc::clone(&inner);
        std::thread::Builder::new().name("dsync-read".into()).spawn(move || reader(&r, input))?;
        let w = Arc::clone(&inner);
        std::thread::Builder::new().name("dsync-write".into()).spawn(move || writer(&w, output))?;
        Ok(Self { inner, timeout, full_seen: false })
    }

    fn check_writer(s: &Shared) -> io::Result<()> {
        match &s.writer_error {
            Some((kind, msg)) => Err(io::Error::new(*kind, msg.clone())),
            None => Ok(()),
        }
    }

    /// Waits on the condition variable until `ready` holds, an error shows, or the stall
    /// timeout passes.
    fn wait_until(&mut self, mut ready: impl FnMut(&Shared) -> bool, need_input: bool) -> io::Result<()> {
        let timeout = self.timeout;
        let inner = Arc::clone(&self.inner);
        let started = Instant::now();
        let mut s = inner.lock();
        loop {
            Self::check_writer(&s)?;
            if ready(&s) {
                return Ok(());
            }
            let now = Instant::now();
            // The last sign of life: this wait's start, the last read, or the writer's last
            // progress (or our last queueing onto an empty queue).
            let quiet_since = [s.last_input, s.last_output].into_iter().flatten().fold(started, Instant::max);
            if need_input && s.input.is_empty() && s.in_end.is_none() && now.duration_since(quiet_since) >= timeout {
                return Err(stalled("no input from the peer", timeout));
            }
            if (s.out_bytes > 0 || s.out_bodies > 0)
                && let Some(t) = s.last_output
                && now.duration_since(t) >= timeout
            {
                return Err(stalled("the peer is not reading our output", timeout));
            }
            let (guard, _) = inner
                .cv
                .wait_timeout(s, Duration::from_millis(500).min(timeout))
                .map_err(|_| io::Error::other("I/O thread panicked"))?;
            s = guard;
        }
    }
}

fn reader<R: Read>(inner: &Inner, mut input: R) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        {
            let mut s = inner.lock();
            while s.in_bytes >= IN_LIMIT && !s.gone {
                s = inner.cv.wait(s).unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            if s.gone {
                return;
            }
        }
        let r = input.read(&mut buf);
        let mut s = inner.lock();
        match r {
            Ok(0) => {
                s.in_end = Some(InEnd::Eof);
                inner.cv.notify_all();
                return;
            }
            Ok(n) => {
                s.input.push_back(buf[..n].to_vec());
                s.in_bytes += n;
                s.last_input = Some(Instant::now());
                inner.cv.notify_all();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                s.in_end = Some(InEnd::Error(e.kind(), e.to_string()));
                inner.cv.notify_all();
                return;
            }
        }
    }
}

fn writer<W: Write>(inner: &Inner, mut output: W) {
    let result = write_loop(inner, &mut output);
    let mut s = inner.lock();
    match result {
        Ok(()) => s.writer_done = true,
        Err(e) => {
            if s.writer_error.is_none() {
                s.writer_error = Some((e.kind(), e.to_string()));
            }
            // Whatever is still queued will never be written.
            s.output.clear();
            s.out_bytes = 0;
            s.out_bodies = 0;
        }
    }
    inner.cv.notify_all();
    // `output` is dropped here: the peer sees the end of our stream.
}

fn write_loop<W: Write>(inner: &Inner, output: &mut W) -> io::Result<()> {
    let mut chunk = vec![0u8; CHUNK];
    let mut encoded = Vec::with_capacity(CHUNK + CHUNK / 8);
    loop {
        let item = {
            let mut s = inner.lock();
            loop {
                if s.gone {
                    return Ok(());
                }
                if let Some(item) = s.output.pop_front() {
                    break item;
                }
                if s.out_closed {
                    drop(s);
                    output.flush()?;
                    return Ok(());
                }
                drop(s);
                // Nothing queued: push out what buffered writers hold before sleeping.
                output.flush()?;
                s = inner.lock();
                if s.output.is_empty() && !s.out_closed && !s.gone {
                    s = inner.cv.wait(s).unwrap_or_else(std::sync::PoisonError::into_inner);
                }
            }
        };
        match item {
            OutItem::Bytes(b) => {
                output.write_all(&b)?;
                let mut s = inner.lock();
                s.out_bytes = s.out_bytes.saturating_sub(b.len());
                s.last_output = Some(Instant::now());
                inner.cv.notify_all();
            }
            OutItem::Body(mut body, mut enc) => {
                loop {
                    let n = match body.read(&mut chunk) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            // Ending the body cleanly would give the peer a truncated mail:
                            // the connection must fail instead.
                            return Err(io::Error::new(e.kind(), format!("reading a mail body to send: {e}")));
                        }
                    };
                    encoded.clear();
                    enc.encode(&chunk[..n], &mut encoded);
                    output.write_all(&encoded)?;
                    inner.lock().last_output = Some(Instant::now());
                    inner.cv.notify_all();
                }
                encoded.clear();
                enc.finish(&mut encoded);
                output.write_all(&encoded)?;
                let mut s = inner.lock();
                s.out_bodies = s.out_bodies.saturating_sub(1);
                s.last_output = Some(Instant::now());
                inner.cv.notify_all();
            }
        }
    }
}

impl Transport for ThreadedIo {
    fn try_read(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut s = self.inner.lock();
        if let Some(chunk) = s.input.pop_front() {
            s.in_bytes -= chunk.len();
            self.inner.cv.notify_all();
            return Ok(Some(chunk));
        }
        match &s.in_end {
            None => Ok(None),
            Some(InEnd::Eof) => Ok(Some(Vec::new())),
            Some(InEnd::Error(kind, msg)) => Err(io::Error::new(*kind, msg.clone())),
        }
    }

    fn read_blocking(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(v) = self.try_read()? {
                return Ok(v);
            }
            self.wait_until(|s| !s.input.is_empty() || s.in_end.is_some(), true)?;
        }
    }

    fn queue(&mut self, item: OutItem) -> io::Result<()> {
        let mut s = self.inner.lock();
        Self::check_writer(&s)?;
        if s.out_closed {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "output already closed"));
        }
        if s.out_bytes == 0 && s.out_bodies == 0 {
            s.last_output = Some(Instant::now());
        }
        match &item {
            OutItem::Bytes(b) => s.out_bytes += b.len(),
            OutItem::Body(..) => s.out_bodies += 1,
        }
        s.output.push_back(item);
        self.inner.cv.notify_all();
        Ok(())
    }

    fn queue_full(&mut self) -> bool {
        let full = self.inner.lock().is_full();
        self.full_seen |= full;
        full
    }

    fn wait(&mut self) -> io::Result<()> {
        let was_full = std::mem::take(&mut self.full_seen);
        self.wait_until(|s| !s.input.is_empty() || s.in_end.is_some() || (was_full && !s.is_full()), true)
    }

    fn finish(&mut self) -> io::Result<()> {
        {
            let mut s = self.inner.lock();
            s.out_closed = true;
            self.inner.cv.notify_all();
        }
        self.wait_until(|s| s.writer_done, false)
    }
}

impl Drop for ThreadedIo {
    fn drop(&mut self) {
        // Threads may be stuck in read(2)/write(2) on a peer that went quiet: they are told to
        // stop and left to end with the process, never joined.
        let mut s = self.inner.lock();
        s.gone = true;
        s.out_closed = true;
        self.inner.cv.notify_all();
    }
}

/// A transport over input that is all there from the start, writing into memory: for unit
/// tests and fuzzing, without threads. Waiting for more input than there is fails at once.
#[derive(Default)]
pub(crate) struct MemoryIo {
    input: VecDeque<Vec<u8>>,
    /// Everything written, bodies dot-stuffed.
    pub(crate) output: Vec<u8>,
    /// Keep at most this many output bytes (the rest is counted and dropped).
    pub(crate) keep_output: usize,
}

impl MemoryIo {
    /// Input split into `chunk`-sized pieces.
    pub(crate) fn new(input: &[u8], chunk: usize) -> Self {
        let input = input.chunks(chunk.max(1)).map(<[u8]>::to_vec).collect();
        Self { input, output: Vec::new(), keep_output: usize::MAX }
    }

    fn put(&mut self, data: &[u8]) {
        let room = self.keep_output.saturating_sub(self.output.len());
        self.output.extend_from_slice(&data[..data.len().min(room)]);
    }
}

impl Transport for MemoryIo {
    fn try_read(&mut self) -> io::Result<Option<Vec<u8>>> {
        Ok(Some(self.input.pop_front().unwrap_or_default()))
    }

    fn read_blocking(&mut self) -> io::Result<Vec<u8>> {
        Ok(self.input.pop_front().unwrap_or_default())
    }

    fn queue(&mut self, item: OutItem) -> io::Result<()> {
        match item {
            OutItem::Bytes(b) => self.put(&b),
            OutItem::Body(mut body, mut enc) => {
                let mut all = Vec::new();
                body.read_to_end(&mut all)?;
                let mut encoded = Vec::new();
                enc.encode(&all, &mut encoded);
                enc.finish(&mut encoded);
                self.put(&encoded);
            }
        }
        Ok(())
    }

    fn queue_full(&mut self) -> bool {
        false
    }

    fn wait(&mut self) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::UnexpectedEof, "waiting for input that will never come"))
    }

    fn finish(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct ChanWriter(std::sync::mpsc::Sender<Vec<u8>>);
    impl Write for ChanWriter {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let _ = self.0.send(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_and_bodies_in_order() {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let mut io = ThreadedIo::start(&b"hello world"[..], ChanWriter(tx), Duration::from_secs(5)).unwrap();
        let mut got = Vec::new();
        loop {
            let v = io.read_blocking().unwrap();
            if v.is_empty() {
                break;
            }
            got.extend(v);
        }
        assert_eq!(got, b"hello world");
        io.queue(OutItem::Bytes(b"M1\n".to_vec())).unwrap();
        io.queue(OutItem::Body(Box::new(&b".dot\nx"[..]), DotEncoder::new())).unwrap();
        io.queue(OutItem::Bytes(b".\n".to_vec())).unwrap();
        io.finish().unwrap();
        let all: Vec<u8> = rx.try_iter().flatten().collect();
        assert_eq!(all, b"M1\n..dot\nx\r\n.\r\n.\n");
    }

    /// A writer that never accepts a byte: the peer stopped reading.
    struct Stuck;
    impl Write for Stuck {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            std::thread::sleep(Duration::from_secs(3600));
            Ok(0)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A reader that never delivers a byte.
    struct Silent;
    impl Read for Silent {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            std::thread::sleep(Duration::from_secs(3600));
            Ok(0)
        }
    }

    #[test]
    fn stalls_in_either_direction_end_the_session() {
        let t = Duration::from_millis(300);
        let mut io = ThreadedIo::start(Silent, Stuck, t).unwrap();
        let start = Instant::now();
        let e = io.read_blocking().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        io.queue(OutItem::Bytes(vec![b'x'; 10])).unwrap();
        let e = io.finish().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(start.elapsed() < Duration::from_secs(5));
        // Dropping does not wait for the stuck threads.
        drop(io);
    }

    /// A peer that sends a queue's worth at once, then the rest slowly, in pieces `gap` apart.
    struct Slow {
        first: usize,
        rest: usize,
        gap: Duration,
    }
    impl Read for Slow {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.first > 0 {
                let n = self.first.min(buf.len());
                self.first -= n;
                buf[..n].fill(b'a');
                return Ok(n);
            }
            if self.rest == 0 {
                return Ok(0);
            }
            std::thread::sleep(self.gap);
            let n = self.rest.min(buf.len()).min(100);
            self.rest -= n;
            buf[..n].fill(b'b');
            Ok(n)
        }
    }

    /// The regression of a 2,000,000-mail backup: a brain busy for longer than the timeout
    /// while its input queue was full, then waiting for a peer that answers within it, is not
    /// a stall (the clock used to run from the reader's last read).
    #[test]
    fn a_busy_brain_is_not_a_stalled_peer() {
        let t = Duration::from_millis(400);
        let input = Slow { first: IN_LIMIT, rest: 300, gap: t / 4 };
        let (tx, _rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let mut io = ThreadedIo::start(input, ChanWriter(tx), t).unwrap();
        // The reader fills its queue and stops; the brain is busy elsewhere meanwhile.
        std::thread::sleep(t * 3);
        let mut got = 0;
        loop {
            let v = io.read_blocking().expect("a slow peer within the timeout is no stall");
            if v.is_empty() {
                break;
            }
            got += v.len();
        }
        assert_eq!(got, IN_LIMIT + 300);
    }

    /// A peer that takes what we send slowly and steadily.
    struct SlowTaker(Duration);
    impl Write for SlowTaker {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            std::thread::sleep(self.0);
            Ok(b.len().min(OUT_LIMIT / 8))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The 2,000,000-mail backup again, from the master's side: it sends for longer than the
    /// timeout while the peer, busy saving, says nothing. The peer is alive: it reads.
    #[test]
    fn sending_to_a_quiet_peer_that_reads_is_not_a_stall() {
        let t = Duration::from_millis(400);
        let mut io = ThreadedIo::start(Silent, SlowTaker(t / 8), t).unwrap();
        let start = Instant::now();
        let mut sent = 0;
        while start.elapsed() < t * 3 {
            if io.queue_full() {
                io.wait().expect("a peer that reads what we send has not stalled");
                continue;
            }
            io.queue(OutItem::Bytes(vec![b'x'; OUT_LIMIT / 4])).unwrap();
            sent += 1;
        }
        assert!(sent > 8, "the writer made progress ({sent} pieces queued)");
        drop(io);
    }

    #[test]
    fn a_failing_body_fails_the_connection() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        let (tx, _rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let mut io = ThreadedIo::start(&b""[..], ChanWriter(tx), Duration::from_secs(5)).unwrap();
        io.queue(OutItem::Body(Box::new(Broken), DotEncoder::new())).unwrap();
        let e = io.finish().unwrap_err();
        assert!(e.to_string().contains("disk on fire"), "{e}");
    }
}

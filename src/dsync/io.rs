//! Moving bytes between the brain and a pair of byte streams (stdin/stdout, an SSH channel,
//! a socket) with one reader thread and one writer thread.
//!
//! dsync is not request/response: Dovecot writes whenever it has something to say and expects
//! its peer to keep reading. So reading and writing must never wait for each other: the reader
//! thread keeps pulling input into a bounded queue, the writer thread keeps pushing our output,
//! and the brain only ever waits for input. Both queues are bounded, so memory stays bounded
//! whatever the size of the mails.

use std::io::{self, Read, Write};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::Duration;

/// Size of one read.
const CHUNK: usize = 64 * 1024;
/// Chunks queued between the reader thread and the brain (at most 16 MiB).
const IN_QUEUE: usize = 256;
/// Buffers queued between the brain and the writer thread.
const OUT_QUEUE: usize = 256;

/// The byte pipes of a connection.
pub(crate) struct ByteIo {
    rx: Receiver<io::Result<Vec<u8>>>,
    tx: Option<SyncSender<Vec<u8>>>,
    timeout: Duration,
    eof: bool,
    writer: Option<JoinHandle<io::Result<()>>>,
    reader: Option<JoinHandle<()>>,
}

impl ByteIo {
    /// Starts the reader and writer threads. `timeout` is how long input may stall.
    pub(crate) fn start<R, W>(mut input: R, mut output: W, timeout: Duration) -> Self
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        let (in_tx, rx) = sync_channel::<io::Result<Vec<u8>>>(IN_QUEUE);
        let reader = std::thread::Builder::new()
            .name("dsync-read".into())
            .spawn(move || {
                loop {
                    let mut buf = vec![0u8; CHUNK];
                    match input.read(&mut buf) {
                        Ok(0) => {
                            let _ = in_tx.send(Ok(Vec::new()));
                            return;
                        }
                        Ok(n) => {
                            buf.truncate(n);
                            if in_tx.send(Ok(buf)).is_err() {
                                return;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            let _ = in_tx.send(Err(e));
                            return;
                        }
                    }
                }
            })
            .ok();
        let (tx, out_rx) = sync_channel::<Vec<u8>>(OUT_QUEUE);
        let writer = std::thread::Builder::new()
            .name("dsync-write".into())
            .spawn(move || -> io::Result<()> {
                while let Ok(buf) = out_rx.recv() {
                    output.write_all(&buf)?;
                    // Flush when nothing else is queued, so small records go out promptly.
                    if let Ok(next) = out_rx.try_recv() {
                        output.write_all(&next)?;
                    }
                    output.flush()?;
                }
                output.flush()
            })
            .ok();
        Self { rx, tx: Some(tx), timeout, eof: false, writer, reader }
    }

    /// Queues bytes for the writer thread.
    pub(crate) fn write(&mut self, data: Vec<u8>) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let Some(tx) = &self.tx else {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "output already closed"));
        };
        match tx.try_send(data) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(data)) => {
                tx.send(data).map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the remote closed its input"))
            }
            Err(TrySendError::Disconnected(_)) => {
                Err(io::Error::new(io::ErrorKind::BrokenPipe, "the remote closed its input"))
            }
        }
    }

    /// Waits for more input; an empty vector means end of input.
    pub(crate) fn read(&mut self) -> io::Result<Vec<u8>> {
        if self.eof {
            return Ok(Vec::new());
        }
        match self.rx.recv_timeout(self.timeout) {
            Ok(Ok(v)) => {
                if v.is_empty() {
                    self.eof = true;
                }
                Ok(v)
            }
            Ok(Err(e)) => Err(e),
            Err(RecvTimeoutError::Timeout) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("I/O has stalled: no input for {} s", self.timeout.as_secs()),
            )),
            Err(RecvTimeoutError::Disconnected) => {
                self.eof = true;
                Ok(Vec::new())
            }
        }
    }

    /// Closes our output (the peer reads EOF) and waits until everything was written.
    pub(crate) fn finish(&mut self) -> io::Result<()> {
        self.tx = None;
        if let Some(w) = self.writer.take() {
            match w.join() {
                Ok(r) => r?,
                Err(_) => return Err(io::Error::other("writer thread panicked")),
            }
        }
        Ok(())
    }
}

impl Drop for ByteIo {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        // The reader may be blocked in read(2) on a pipe that stays open; it exits when the
        // process does, so it is detached rather than joined.
        drop(self.reader.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_through_threads() {
        let (out_tx, out_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        struct W(std::sync::mpsc::Sender<Vec<u8>>);
        impl Write for W {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                let _ = self.0.send(b.to_vec());
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut io = ByteIo::start(&b"hello world"[..], W(out_tx), Duration::from_secs(5));
        let mut got = Vec::new();
        loop {
            let v = io.read().unwrap();
            if v.is_empty() {
                break;
            }
            got.extend(v);
        }
        assert_eq!(got, b"hello world");
        io.write(b"out".to_vec()).unwrap();
        io.finish().unwrap();
        let all: Vec<u8> = out_rx.try_iter().flatten().collect();
        assert_eq!(all, b"out");
    }
}

//! Two brains in one process, joined without the wire codec (Dovecot's `dsync-ibc-pipe.c`):
//! each side's records go straight into the other side's queue, mail bodies as the readers
//! the sender's store opened. For fast tests of both roles on the in-memory store.
//!
//! The queues behave like the byte transport: sending never blocks, [`Ibc::send_queue_full`]
//! turns true at a soft limit, and [`Ibc::wait`] wakes up when the other side sent something
//! or took something, with the same stall timeout. So a brain that would deadlock on real
//! pipes deadlocks (and times out) here too.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::brain::ibc::{Ibc, IbcError, Incoming, Settings};
use super::brain::tree::{Delete, NodeData};
use super::brain::types::{DsyncMailbox, MailChange, MailHeader, MailRequest, MailboxState};
use super::wire;

/// Records queued in one direction before bulk senders pause.
const QUEUE_LIMIT: usize = 256;
/// Mail bodies queued in one direction before bulk senders pause.
const BODY_LIMIT: usize = 8;

type Body = Box<dyn Read + Send>;

#[derive(Default)]
struct Direction {
    queue: VecDeque<(Incoming, Option<Body>)>,
    bodies: usize,
    /// The sending side is gone (dropped, or sent `X`).
    closed: bool,
}

#[derive(Default)]
struct Pair {
    /// `dirs[i]` carries what side `i` sends.
    dirs: [Direction; 2],
}

struct Shared {
    pair: Mutex<Pair>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pair> {
        self.pair.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One end of an in-process pipe.
pub(crate) struct PipeIbc {
    shared: Arc<Shared>,
    side: usize,
    timeout: Duration,
    body: Option<Body>,
    empty: io::Empty,
    full_seen: bool,
}

/// Two connected ends.
pub(crate) fn pipe_pair(timeout: Duration) -> (PipeIbc, PipeIbc) {
    let shared = Arc::new(Shared { pair: Mutex::new(Pair::default()), cv: Condvar::new() });
    let end =
        |side| PipeIbc { shared: Arc::clone(&shared), side, timeout, body: None, empty: io::empty(), full_seen: false };
    (end(0), end(1))
}

impl PipeIbc {
    fn push(&mut self, item: Incoming, body: Option<Body>) -> Result<(), IbcError> {
        let mut p = self.shared.lock();
        let d = &mut p.dirs[self.side];
        if d.closed {
            return Err(IbcError::Io(io::Error::new(io::ErrorKind::BrokenPipe, "output already closed")));
        }
        if body.is_some() {
            d.bodies += 1;
        }
        d.queue.push_back((item, body));
        // Only a receiver that found the queue empty can be waiting for it.
        if d.queue.len() == 1 {
            self.shared.cv.notify_all();
        }
        Ok(())
    }

    fn full(p: &Pair, side: usize) -> bool {
        let d = &p.dirs[side];
        d.queue.len() >= QUEUE_LIMIT || d.bodies >= BODY_LIMIT
    }
}

impl Drop for PipeIbc {
    fn drop(&mut self) {
        let mut p = self.shared.lock();
        p.dirs[self.side].closed = true;
        self.shared.cv.notify_all();
    }
}

impl Ibc for PipeIbc {
    fn send_handshake(&mut self, s: &Settings) -> Result<(), IbcError> {
        self.push(Incoming::Handshake(s.clone()), None)
    }

    fn send_mailbox_state(&mut self, s: &MailboxState) -> Result<(), IbcError> {
        self.push(Incoming::MailboxState(*s), None)
    }

    fn send_node(&mut self, parts: &[String], data: &NodeData) -> Result<(), IbcError> {
        self.push(Incoming::Node { parts: parts.to_vec(), data: data.clone() }, None)
    }

    fn send_deletes(&mut self, sep: char, escape: Option<char>, deletes: &[Delete]) -> Result<(), IbcError> {
        self.push(Incoming::Deletes { sep, escape, deletes: deletes.to_vec() }, None)
    }

    fn send_mailbox(&mut self, b: &DsyncMailbox) -> Result<(), IbcError> {
        self.push(Incoming::Mailbox(b.clone()), None)
    }

    fn send_change(&mut self, c: &MailChange) -> Result<(), IbcError> {
        self.push(Incoming::Change(c.clone()), None)
    }

    fn send_request(&mut self, r: &MailRequest) -> Result<(), IbcError> {
        self.push(Incoming::Request(r.clone()), None)
    }

    fn send_mail(&mut self, h: &MailHeader, body: Option<Body>) -> Result<(), IbcError> {
        let mut h = h.clone();
        h.has_body = body.is_some();
        self.push(Incoming::Mail(h), body)
    }

    fn send_finish(&mut self, error: Option<&str>, mail_error: u32, require_full_resync: bool) -> Result<(), IbcError> {
        self.push(Incoming::Finish { error: error.map(str::to_owned), mail_error, require_full_resync }, None)
    }

    fn send_end_of_list(&mut self) -> Result<(), IbcError> {
        self.push(Incoming::EndOfList, None)
    }

    fn send_done(&mut self) -> Result<(), IbcError> {
        self.push(Incoming::Done, None)?;
        self.shared.lock().dirs[self.side].closed = true;
        Ok(())
    }

    fn send_queue_full(&mut self) -> bool {
        let full = Self::full(&self.shared.lock(), self.side);
        self.full_seen |= full;
        full
    }

    fn flush(&mut self) -> Result<(), IbcError> {
        Ok(())
    }

    fn peer_minor(&self) -> u32 {
        wire::PROTOCOL_MINOR
    }

    fn try_recv(&mut self) -> Result<Option<Incoming>, IbcError> {
        self.body = None;
        let mut p = self.shared.lock();
        let other = 1 - self.side;
        let d = &mut p.dirs[other];
        match d.queue.pop_front() {
            Some((item, body)) => {
                // Only a sender that found the queue full can be waiting for room.
                let was_full = d.queue.len() + 1 >= QUEUE_LIMIT || d.bodies >= BODY_LIMIT;
                if body.is_some() {
                    d.bodies -= 1;
                }
                self.body = body;
                if was_full {
                    self.shared.cv.notify_all();
                }
                Ok(Some(item))
            }
            None if d.closed => Err(IbcError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the remote closed the connection in the middle of the session",
            ))),
            None => Ok(None),
        }
    }

    fn wait(&mut self) -> Result<(), IbcError> {
        let was_full = std::mem::take(&mut self.full_seen);
        let other = 1 - self.side;
        let start = Instant::now();
        let mut p = self.shared.lock();
        loop {
            if !p.dirs[other].queue.is_empty() || p.dirs[other].closed || (was_full && !Self::full(&p, self.side)) {
                return Ok(());
            }
            let left = self.timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(IbcError::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("I/O has stalled: nothing from the other brain for {} s", self.timeout.as_secs()),
                )));
            }
            p = self.shared.cv.wait_timeout(p, left).map(|(g, _)| g).unwrap_or_else(|e| e.into_inner().0);
        }
    }

    fn body(&mut self) -> &mut dyn Read {
        match &mut self.body {
            Some(b) => b,
            None => &mut self.empty,
        }
    }
}

//! The brain's connection ([`Ibc`]) over a byte stream: the wire codec on top of a
//! [`Transport`] (reader and writer threads over real streams, or memory for tests).

use std::io::{self, Read};

use super::brain::ibc::{Ibc, IbcError, Incoming, Settings};
use super::brain::tree::{Delete, NodeData};
use super::brain::types::{DsyncMailbox, MailChange, MailHeader, MailRequest, MailboxState};
use super::convert;
use super::io::{OutItem, Transport};
use super::wire::{self, Decoder, Encoder, Event, Record, WireError};

/// Encoded records are handed to the transport in pieces of about this size.
const FLUSH_AT: usize = 64 * 1024;

/// A dsync connection over bytes.
pub(crate) struct WireIbc<T: Transport> {
    io: T,
    dec: Decoder,
    enc: Encoder,
    out: Vec<u8>,
    peer_minor: Option<u32>,
    /// A mail body is being received: content not yet read, and whether its end was seen.
    body_buf: Vec<u8>,
    body_pos: usize,
    in_body: bool,
    eof: bool,
}

fn misuse(e: WireError) -> IbcError {
    match e {
        WireError::Misuse(m) => IbcError::Io(io::Error::other(format!("internal error: {m}"))),
        other => IbcError::Wire(other),
    }
}

impl<T: Transport> WireIbc<T> {
    /// Starts a connection: our VERSION line and header block are queued at once.
    pub(crate) fn start(io: T) -> Self {
        let enc = Encoder::new();
        let mut out = Vec::with_capacity(FLUSH_AT * 2);
        enc.greeting(&mut out);
        Self {
            io,
            dec: Decoder::new(),
            enc,
            out,
            peer_minor: None,
            body_buf: Vec::new(),
            body_pos: 0,
            in_body: false,
            eof: false,
        }
    }

    /// Closes our output once everything queued is written (bounded by the stall timeout).
    pub(crate) fn finish(&mut self) -> Result<(), IbcError> {
        self.flush()?;
        self.io.finish()?;
        Ok(())
    }

    /// The transport, once the session is over (for tests that look at what was written).
    pub(crate) fn into_transport(self) -> T {
        self.io
    }

    fn maybe_flush(&mut self) -> Result<(), IbcError> {
        if self.out.len() >= FLUSH_AT {
            self.flush()?;
        }
        Ok(())
    }

    fn record(&mut self, r: Record) -> Result<(), IbcError> {
        self.enc.record(&r, &mut self.out).map_err(misuse)?;
        self.maybe_flush()
    }

    fn feed(&mut self, data: Vec<u8>) {
        if data.is_empty() {
            self.eof = true;
            self.dec.feed_eof();
        } else {
            self.dec.feed(&data);
        }
    }

    fn early_end() -> IbcError {
        IbcError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the remote closed the connection in the middle of the session",
        ))
    }

    /// The next decoded event from what has arrived, without waiting.
    fn try_event(&mut self) -> Result<Option<Event>, IbcError> {
        loop {
            if let Some(ev) = self.dec.next()? {
                return Ok(Some(ev));
            }
            if self.eof || self.dec.is_done() {
                return Err(Self::early_end());
            }
            match self.io.try_read()? {
                Some(data) => self.feed(data),
                None => return Ok(None),
            }
        }
    }

    /// The next decoded event, waiting for input (only used inside bodies, which the peer is
    /// in the middle of sending).
    fn next_event(&mut self) -> Result<Event, IbcError> {
        loop {
            if let Some(ev) = self.dec.next()? {
                return Ok(ev);
            }
            if self.eof || self.dec.is_done() {
                return Err(Self::early_end());
            }
            self.flush()?;
            let data = self.io.read_blocking()?;
            self.feed(data);
        }
    }

    /// Skips whatever is left of a body the caller did not read.
    fn drain_body(&mut self) -> Result<(), IbcError> {
        while self.in_body {
            match self.next_event()? {
                Event::BodyChunk(_) => {}
                Event::BodyEnd => self.in_body = false,
                other => return Err(IbcError::Protocol(format!("unexpected {other:?} inside a mail body"))),
            }
        }
        self.body_buf.clear();
        self.body_pos = 0;
        Ok(())
    }

    fn incoming(&mut self, r: Record) -> Result<Incoming, IbcError> {
        let has_body = r.has_body();
        Ok(match r {
            Record::Handshake(h) => Incoming::Handshake(convert::settings_from_wire(&h)),
            Record::MailboxState(s) => Incoming::MailboxState(convert::state_from_wire(&s)),
            Record::MailboxNode(n) => {
                let (parts, data) = convert::node_from_wire(&n);
                Incoming::Node { parts, data }
            }
            Record::MailboxDeletes(d) => {
                let (sep, escape, deletes) = convert::deletes_from_wire(&d);
                Incoming::Deletes { sep, escape, deletes }
            }
            Record::Mailbox(b) => Incoming::Mailbox(convert::mailbox_from_wire(&b)),
            Record::Attribute(_) => {
                // We keep no mailbox attributes; skip a streamed value.
                self.in_body = has_body;
                self.drain_body()?;
                Incoming::Attribute
            }
            Record::MailChange(c) => Incoming::Change(convert::change_from_wire(&c)),
            Record::MailRequest(r) => Incoming::Request(convert::request_from_wire(&r)),
            Record::Mail(m) => {
                self.in_body = has_body;
                Incoming::Mail(convert::mail_from_wire(&m))
            }
            Record::Finish(f) => Incoming::Finish {
                error: f.error.map(|e| e.to_string()),
                mail_error: u32::try_from(f.mail_error).unwrap_or(1),
                require_full_resync: f.require_full_resync,
            },
        })
    }
}

impl<T: Transport> Read for WireIbc<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.body_pos < self.body_buf.len() {
                let n = (self.body_buf.len() - self.body_pos).min(buf.len());
                buf[..n].copy_from_slice(&self.body_buf[self.body_pos..self.body_pos + n]);
                self.body_pos += n;
                return Ok(n);
            }
            if !self.in_body {
                return Ok(0);
            }
            match self.next_event() {
                Ok(Event::BodyChunk(c)) => {
                    self.body_buf = c.into_bytes();
                    self.body_pos = 0;
                }
                Ok(Event::BodyEnd) => {
                    self.in_body = false;
                    self.body_buf.clear();
                    self.body_pos = 0;
                    return Ok(0);
                }
                Ok(other) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("unexpected {other:?} inside a mail body"),
                    ));
                }
                Err(IbcError::Io(e)) => return Err(e),
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
            }
        }
    }
}

impl<T: Transport> Ibc for WireIbc<T> {
    fn send_handshake(&mut self, s: &Settings) -> Result<(), IbcError> {
        self.record(Record::Handshake(Box::new(convert::settings_to_wire(s))))
    }

    fn send_mailbox_state(&mut self, s: &MailboxState) -> Result<(), IbcError> {
        self.record(Record::MailboxState(convert::state_to_wire(s)))
    }

    fn send_node(&mut self, parts: &[String], data: &NodeData) -> Result<(), IbcError> {
        match convert::node_to_wire(parts, data) {
            Some(n) => self.record(Record::MailboxNode(n)),
            None => {
                tracing::warn!(?parts, "not sending a mailbox tree node without a name");
                Ok(())
            }
        }
    }

    fn send_deletes(&mut self, sep: char, escape: Option<char>, deletes: &[Delete]) -> Result<(), IbcError> {
        let d = convert::deletes_to_wire(sep, escape, deletes)
            .ok_or_else(|| IbcError::Io(io::Error::other(format!("hierarchy separator {sep:?} cannot be sent"))))?;
        self.record(Record::MailboxDeletes(d))
    }

    fn send_mailbox(&mut self, b: &DsyncMailbox) -> Result<(), IbcError> {
        self.record(Record::Mailbox(convert::mailbox_to_wire(b)))
    }

    fn send_change(&mut self, c: &MailChange) -> Result<(), IbcError> {
        self.record(Record::MailChange(convert::change_to_wire(c)))
    }

    fn send_request(&mut self, r: &MailRequest) -> Result<(), IbcError> {
        self.record(Record::MailRequest(convert::request_to_wire(r)))
    }

    fn send_mail(&mut self, h: &MailHeader, body: Option<Box<dyn Read + Send>>) -> Result<(), IbcError> {
        let mut h = h.clone();
        h.has_body = body.is_some();
        self.enc.record(&Record::Mail(convert::mail_to_wire(&h)), &mut self.out).map_err(misuse)?;
        if let Some(body) = body {
            // The record line must reach the writer before its body.
            let enc = self.enc.detach_body().map_err(misuse)?;
            self.flush()?;
            self.io.queue(OutItem::Body(body, enc))?;
        }
        self.maybe_flush()
    }

    fn send_finish(&mut self, error: Option<&str>, mail_error: u32, require_full_resync: bool) -> Result<(), IbcError> {
        if self.peer_minor.unwrap_or(wire::PROTOCOL_MINOR) < wire::MINOR_HAVE_FINISH {
            return Ok(());
        }
        let f = wire::Finish {
            error: error.and_then(|e| wire::Text::new(e.as_bytes().to_vec()).ok()),
            mail_error: i32::try_from(mail_error).unwrap_or(1),
            require_full_resync,
        };
        self.record(Record::Finish(f))
    }

    fn send_end_of_list(&mut self) -> Result<(), IbcError> {
        self.enc.end_of_list(&mut self.out).map_err(misuse)?;
        self.maybe_flush()
    }

    fn send_done(&mut self) -> Result<(), IbcError> {
        self.enc.done(&mut self.out).map_err(misuse)?;
        self.maybe_flush()
    }

    fn send_queue_full(&mut self) -> bool {
        if self.out.len() >= FLUSH_AT && self.flush().is_err() {
            // The error shows again at the next send.
            return true;
        }
        self.io.queue_full()
    }

    fn flush(&mut self) -> Result<(), IbcError> {
        if !self.out.is_empty() {
            let data = std::mem::replace(&mut self.out, Vec::with_capacity(FLUSH_AT * 2));
            self.io.queue(OutItem::Bytes(data))?;
        }
        Ok(())
    }

    fn peer_minor(&self) -> u32 {
        self.peer_minor.unwrap_or(wire::PROTOCOL_MINOR)
    }

    fn try_recv(&mut self) -> Result<Option<Incoming>, IbcError> {
        self.drain_body()?;
        loop {
            let Some(ev) = self.try_event()? else { return Ok(None) };
            return Ok(Some(match ev {
                Event::Greeting { minor } => {
                    self.peer_minor = Some(minor);
                    continue;
                }
                Event::EndOfList => Incoming::EndOfList,
                Event::Done => Incoming::Done,
                Event::BodyChunk(_) | Event::BodyEnd => {
                    return Err(IbcError::Protocol("mail body data outside a mail".into()));
                }
                Event::Record(r) => self.incoming(r)?,
            }));
        }
    }

    fn wait(&mut self) -> Result<(), IbcError> {
        self.flush()?;
        self.io.wait()?;
        Ok(())
    }

    fn body(&mut self) -> &mut dyn Read {
        self
    }
}

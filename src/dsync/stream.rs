//! The brain's connection ([`Ibc`]) over a byte stream: the wire codec on top of the reader
//! and writer threads of [`ByteIo`].

use std::io::{self, Read};

use super::brain::ibc::{Ibc, IbcError, Incoming, Settings};
use super::brain::tree::{Delete, NodeData};
use super::brain::types::{DsyncMailbox, MailChange, MailHeader, MailRequest, MailboxState};
use super::convert;
use super::io::ByteIo;
use super::wire::{self, Decoder, Encoder, Event, Record, WireError};

/// Output is handed to the writer thread in pieces of about this size.
const FLUSH_AT: usize = 64 * 1024;

/// A dsync connection over bytes.
pub(crate) struct WireIbc {
    io: ByteIo,
    dec: Decoder,
    enc: Encoder,
    out: Vec<u8>,
    peer_minor: Option<u32>,
    /// A mail body is being received: chunks not yet read and whether its end was seen.
    body_buf: Vec<u8>,
    body_pos: usize,
    in_body: bool,
    eof: bool,
}

fn wire_err(e: WireError) -> IbcError {
    match e {
        WireError::Misuse(m) => IbcError::Io(io::Error::other(format!("internal error: {m:?}"))),
        other => IbcError::Protocol(other.to_string()),
    }
}

impl WireIbc {
    /// Starts a connection: our VERSION line and header block go out at once.
    pub(crate) fn start(io: ByteIo) -> Self {
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

    /// Closes our output and waits until it is all written.
    pub(crate) fn finish(&mut self) -> Result<(), IbcError> {
        self.flush()?;
        self.io.finish()?;
        Ok(())
    }

    fn maybe_flush(&mut self) -> Result<(), IbcError> {
        if self.out.len() >= FLUSH_AT {
            self.flush()?;
        }
        Ok(())
    }

    fn record(&mut self, r: Record) -> Result<(), IbcError> {
        self.enc.record(&r, &mut self.out).map_err(wire_err)?;
        self.maybe_flush()
    }

    /// The next decoded event, reading more input as needed.
    fn next_event(&mut self) -> Result<Event, IbcError> {
        loop {
            if let Some(ev) = self.dec.next().map_err(wire_err)? {
                return Ok(ev);
            }
            if self.eof || self.dec.is_done() {
                return Err(IbcError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the remote closed the connection in the middle of the session",
                )));
            }
            let data = self.io.read()?;
            if data.is_empty() {
                self.eof = true;
                self.dec.feed_eof();
            } else {
                self.dec.feed(&data);
            }
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
}

impl Read for WireIbc {
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
                Err(IbcError::Protocol(p)) => return Err(io::Error::new(io::ErrorKind::InvalidData, p)),
            }
        }
    }
}

impl Ibc for WireIbc {
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
            .ok_or_else(|| IbcError::Protocol(format!("hierarchy separator {sep:?} cannot be sent")))?;
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

    fn send_mail(&mut self, h: &MailHeader, body: Option<&mut dyn Read>) -> Result<(), IbcError> {
        let mut h = h.clone();
        h.has_body = body.is_some();
        self.record(Record::Mail(convert::mail_to_wire(&h)))?;
        if let Some(body) = body {
            let mut buf = vec![0u8; FLUSH_AT];
            loop {
                let n = match body.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // The body cannot be completed: the peer would store a truncated
                        // mail if we ended it cleanly, so the session must fail instead.
                        return Err(IbcError::Io(e));
                    }
                };
                self.enc.body_chunk(&buf[..n], &mut self.out).map_err(wire_err)?;
                self.maybe_flush()?;
            }
            self.enc.body_end(&mut self.out).map_err(wire_err)?;
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
        self.enc.end_of_list(&mut self.out).map_err(wire_err)?;
        self.maybe_flush()
    }

    fn send_done(&mut self) -> Result<(), IbcError> {
        self.enc.done(&mut self.out).map_err(wire_err)?;
        self.maybe_flush()
    }

    fn flush(&mut self) -> Result<(), IbcError> {
        if !self.out.is_empty() {
            let data = std::mem::replace(&mut self.out, Vec::with_capacity(FLUSH_AT * 2));
            self.io.write(data)?;
        }
        Ok(())
    }

    fn peer_minor(&self) -> u32 {
        self.peer_minor.unwrap_or(wire::PROTOCOL_MINOR)
    }

    fn recv(&mut self) -> Result<Incoming, IbcError> {
        self.drain_body()?;
        loop {
            let ev = self.next_event()?;
            return Ok(match ev {
                Event::Greeting { minor } => {
                    self.peer_minor = Some(minor);
                    continue;
                }
                Event::EndOfList => Incoming::EndOfList,
                Event::Done => Incoming::Done,
                Event::BodyChunk(_) | Event::BodyEnd => {
                    return Err(IbcError::Protocol("mail body data outside a mail".into()));
                }
                Event::Record(r) => {
                    let has_body = r.has_body();
                    match r {
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
                    }
                }
            });
        }
    }

    fn body(&mut self) -> &mut dyn Read {
        self
    }
}

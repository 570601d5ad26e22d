//! The outgoing side: typed records in, bytes appended to a `Vec<u8>`.
//!
//! The [`Encoder`] lays records out by our own headers (Dovecot 2.3.19's key order) and keeps
//! one piece of state: whether a body is open. A record with a body (`M` with `stream`, `A`
//! with a streamed value) must be followed by its body chunks and [`Encoder::body_end`] before
//! anything else; encoding anything else in between is refused as [`Misuse`], because the
//! peer would read it as body content.

use super::dot::DotEncoder;
use super::error::{Misuse, WireError};
use super::header::{Headers, encode_version_line};
use super::record::Record;

/// The outgoing half of a dsync connection.
#[derive(Clone, Debug)]
pub struct Encoder {
    headers: Headers,
    body: Option<DotEncoder>,
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Encoder {
    /// An encoder with our own headers ([`Headers::ours`]).
    pub fn new() -> Self {
        Self::with_headers(Headers::ours())
    }

    /// An encoder laying records out by other headers. Useful to reproduce a peer's bytes
    /// (tests) or to speak a reduced schema; keys the headers lack are left out.
    pub fn with_headers(headers: Headers) -> Self {
        Self { headers, body: None }
    }

    /// The headers records are laid out by.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// Append what each side sends first: the VERSION line, one header line per record type
    /// and the closing `.`.
    pub fn greeting(&self, out: &mut Vec<u8>) {
        encode_version_line(out);
        self.headers.encode(out);
    }

    fn no_body_open(&self) -> Result<(), WireError> {
        match self.body {
            Some(_) => Err(WireError::Misuse(Misuse::BodyOpen)),
            None => Ok(()),
        }
    }

    /// Append one record line. If [`Record::has_body`], a body is now open.
    pub fn record(&mut self, record: &Record, out: &mut Vec<u8>) -> Result<(), WireError> {
        self.no_body_open()?;
        record.encode(&self.headers, out)?;
        if record.has_body() {
            self.body = Some(DotEncoder::new());
        }
        Ok(())
    }

    /// Append a `.` line, ending the current list.
    pub fn end_of_list(&mut self, out: &mut Vec<u8>) -> Result<(), WireError> {
        self.no_body_open()?;
        out.extend_from_slice(b".\n");
        Ok(())
    }

    /// Append an `X` line: we are closing.
    pub fn done(&mut self, out: &mut Vec<u8>) -> Result<(), WireError> {
        self.no_body_open()?;
        out.extend_from_slice(b"X\n");
        Ok(())
    }

    /// Append a piece of the open body, dot-stuffed.
    pub fn body_chunk(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), WireError> {
        let body = self.body.as_mut().ok_or(WireError::Misuse(Misuse::NoBodyOpen))?;
        body.encode(chunk, out);
        Ok(())
    }

    /// Append the body terminator and close the body.
    pub fn body_end(&mut self, out: &mut Vec<u8>) -> Result<(), WireError> {
        let body = self.body.take().ok_or(WireError::Misuse(Misuse::NoBodyOpen))?;
        body.finish(out);
        Ok(())
    }

    /// Hand the open body's dot-stuffer over to whoever streams the content (the connection's
    /// writer thread), leaving no body open here. The taker must encode the whole content and
    /// then [`DotEncoder::finish`] it before anything else this encoder produces is sent.
    pub fn detach_body(&mut self) -> Result<DotEncoder, WireError> {
        self.body.take().ok_or(WireError::Misuse(Misuse::NoBodyOpen))
    }

    /// True while a body is open.
    pub fn in_body(&self) -> bool {
        self.body.is_some()
    }
}

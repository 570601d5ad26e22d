//! Round trips against every recorded Dovecot 2.3.19 session in `testdata/`.
//!
//! Each capture is split into its two directions; each direction is decoded by the headers
//! that side sent, re-encoded with those same headers, and must come out byte for byte. The
//! decoded events must also survive encoding with our own headers and with a scrambled header
//! order (decoding is by name, not by position).

use super::super::{Encoder, Event, Headers, ItemHeader, ItemType, Record};
use super::{Chunking, decode_ok, encode_events, normalize};

/// One direction of one session.
pub(crate) struct Direction {
    pub(crate) name: String,
    pub(crate) bytes: Vec<u8>,
}

/// Every capture, both directions, except the one that is empty (in `tcp2` the client never
/// got to speak dsync).
pub(crate) fn all_directions() -> Vec<Direction> {
    let mut all = all_directions_with_empty();
    all.retain(|d| !d.bytes.is_empty());
    all
}

fn all_directions_with_empty() -> Vec<Direction> {
    let mut out = Vec::new();
    let rawlogs: [(&str, &[u8]); 6] = [
        ("raw-ref", include_bytes!("../testdata/raw-ref.log")),
        ("raw-dot", include_bytes!("../testdata/raw-dot.log")),
        ("raw2", include_bytes!("../testdata/raw2.log")),
        ("raw3", include_bytes!("../testdata/raw3.log")),
        ("raw4", include_bytes!("../testdata/raw4.log")),
        ("raw6", include_bytes!("../testdata/raw6.log")),
    ];
    for (name, text) in rawlogs {
        let (sent, received) = parse_rawlog(text);
        out.push(Direction { name: format!("{name} master->slave"), bytes: sent });
        out.push(Direction { name: format!("{name} slave->master"), bytes: received });
    }
    out.push(Direction {
        name: "incremental master->slave".into(),
        bytes: include_bytes!("../testdata/incremental-master-to-slave.bin").to_vec(),
    });
    out.push(Direction {
        name: "incremental slave->master".into(),
        bytes: include_bytes!("../testdata/incremental-slave-to-master.bin").to_vec(),
    });
    for (name, text) in [("tcp", include_str!("../testdata/tcp.log")), ("tcp2", include_str!("../testdata/tcp2.log"))] {
        let (client, server) = parse_tcp_log(text);
        out.push(Direction { name: format!("{name} client->server"), bytes: client });
        out.push(Direction { name: format!("{name} server->client"), bytes: server });
    }
    out
}

/// Parse the prefix `<sec>.<usec> <I|O><:|>> ` at the start of `s`: (is_input, line_ends, len).
fn rawlog_prefix(s: &[u8]) -> Option<(bool, bool, usize)> {
    let secs = s.iter().take_while(|b| b.is_ascii_digit()).count();
    let rest = s.get(secs..)?.strip_prefix(b".")?;
    let usecs = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if secs == 0 || usecs != 6 {
        return None;
    }
    let rest = rest.get(usecs..)?;
    let (dir, kind) = match rest.get(..3)? {
        [b' ', dir @ (b'I' | b'O'), kind @ (b':' | b'>')] => (*dir, *kind),
        _ => return None,
    };
    if rest.get(3) != Some(&b' ') {
        return None;
    }
    Some((dir == b'I', kind == b':', secs + 1 + usecs + 4))
}

/// Split a Dovecot rawlog (`-r`) into (sent, received) bytes. A `:` entry runs to its LF
/// (inclusive); a `>` entry is a partial line with no LF that runs until the next prefix.
pub(in super::super) fn parse_rawlog(text: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let (mut sent, mut received) = (Vec::new(), Vec::new());
    let mut pos = 0;
    while pos < text.len() {
        let rest = text.get(pos..).unwrap_or_default();
        let (input, line_ends, prefix) =
            rawlog_prefix(rest).unwrap_or_else(|| panic!("bad rawlog entry at byte {pos}"));
        let data = rest.get(prefix..).unwrap_or_default();
        let len = if line_ends {
            data.iter().position(|&b| b == b'\n').map_or(data.len(), |i| i + 1)
        } else {
            (1..=data.len())
                .find(|&i| i == data.len() || rawlog_prefix(data.get(i..).unwrap_or_default()).is_some())
                .unwrap_or(0)
        };
        let target = if input { &mut received } else { &mut sent };
        target.extend_from_slice(data.get(..len).unwrap_or_default());
        pos += prefix + len;
    }
    (sent, received)
}

/// Parse a Python `bytes` literal body (between the quotes).
fn python_bytes(lit: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chars = lit.bytes();
    while let Some(c) = chars.next() {
        if c != b'\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'r') => out.push(b'\r'),
            Some(b'x') => {
                let hex: Vec<u8> = chars.by_ref().take(2).collect();
                let v = std::str::from_utf8(&hex).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                out.push(v.unwrap_or_else(|| panic!("bad \\x escape in {lit}")));
            }
            Some(other) => out.push(other),
            None => panic!("trailing backslash in {lit}"),
        }
    }
    out
}

/// Split a TCP proxy log (`C->S <len> b'…'` per packet) into the two dsync streams: the
/// client's after its three doveadm-protocol lines (VERSION, PLAIN, command), and the server's
/// channel-0 data after the doveadm preamble, demultiplexed, without the `LF + LF` reply.
pub(in super::super) fn parse_tcp_log(text: &str) -> (Vec<u8>, Vec<u8>) {
    let (mut client, mut server) = (Vec::new(), Vec::new());
    for line in text.lines().filter(|l| !l.is_empty()) {
        let mut parts = line.splitn(3, ' ');
        let (dir, len, lit) = (parts.next(), parts.next(), parts.next().unwrap_or_default());
        let body = lit.strip_prefix("b'").and_then(|l| l.strip_suffix('\'')).unwrap_or_else(|| {
            lit.strip_prefix("b\"").and_then(|l| l.strip_suffix('"')).unwrap_or_else(|| panic!("bad packet {line}"))
        });
        let bytes = python_bytes(body);
        assert_eq!(len.and_then(|l| l.parse::<usize>().ok()), Some(bytes.len()), "{line}");
        match dir {
            Some("C->S") => client.extend_from_slice(&bytes),
            Some("S->C") => server.extend_from_slice(&bytes),
            _ => panic!("bad direction in {line}"),
        }
    }
    let skip_lines = |bytes: &[u8], n: usize| -> Vec<u8> {
        let mut rest = bytes;
        for _ in 0..n {
            let lf = rest.iter().position(|&b| b == b'\n').unwrap_or_else(|| panic!("missing preamble line"));
            rest = rest.get(lf + 1..).unwrap_or_default();
        }
        rest.to_vec()
    };
    let client = skip_lines(&client, 3);
    // Server: "VERSION…", "-", "+" unmultiplexed, then [channel][len32 BE][data] packets.
    let mut muxed = skip_lines(&server, 3).into_iter();
    let mut channel0 = Vec::new();
    while let Some(channel) = muxed.next() {
        let len: Vec<u8> = muxed.by_ref().take(4).collect();
        let len = u32::from_be_bytes(len.try_into().unwrap_or_else(|_| panic!("short multiplex header"))) as usize;
        let data: Vec<u8> = muxed.by_ref().take(len).collect();
        assert_eq!(data.len(), len, "short multiplex packet");
        if channel == 0 {
            channel0.extend_from_slice(&data);
        }
    }
    let server = channel0.strip_prefix(b"\n+\n").unwrap_or_else(|| panic!("no dsync-server reply")).to_vec();
    (client, server)
}

#[test]
fn rawlog_parser_handles_partial_lines() {
    let log = b"1.000001 O: abc\n1.000002 O> par1.000003 O: tial\n1.000004 I: x\n";
    let (sent, received) = parse_rawlog(log);
    assert_eq!(sent, b"abc\npartial\n");
    assert_eq!(received, b"x\n");
}

#[test]
fn every_capture_is_nonempty_and_starts_with_version() {
    let dirs = all_directions_with_empty();
    assert_eq!(dirs.len(), 18);
    for d in &dirs {
        if d.name == "tcp2 client->server" {
            // The client in tcp2 never got to speak dsync.
            assert!(d.bytes.is_empty());
            continue;
        }
        assert!(d.bytes.starts_with(b"VERSION\tdsync\t3\t5\n"), "{}", d.name);
    }
}

#[test]
fn captures_round_trip_byte_exact_in_any_chunking() {
    for d in all_directions() {
        let (events, headers) = decode_ok(&d.bytes, Chunking::Whole);
        let again = encode_events(&events, &mut Encoder::with_headers(headers.clone()));
        assert!(
            again == d.bytes,
            "{}: re-encoding differs:\n{}\n---\n{}",
            d.name,
            again.escape_ascii(),
            d.bytes.escape_ascii()
        );
        let whole = normalize(events);
        for chunking in [Chunking::Bytewise, Chunking::Random(7), Chunking::Random(1234)] {
            let (events, h) = decode_ok(&d.bytes, chunking);
            assert_eq!(normalize(events), whole, "{} {chunking:?}", d.name);
            assert_eq!(h, headers);
        }
    }
}

#[test]
fn captures_decode_encode_decode_with_our_headers() {
    for d in all_directions() {
        let (events, _) = decode_ok(&d.bytes, Chunking::Whole);
        let ours = encode_events(&events, &mut Encoder::new());
        let (again, headers) = decode_ok(&ours, Chunking::Random(99));
        assert_eq!(normalize(again), normalize(events), "{}", d.name);
        assert_eq!(headers, Headers::ours());
    }
}

/// Our headers with every key list reversed, an unknown key in front, and an unknown type.
fn scrambled_headers() -> Headers {
    let mut h = Headers::empty();
    h.insert(ItemType::from_byte(b'Z'), ItemHeader::new(["future", "stuff"]));
    for (item, header) in Headers::ours().iter() {
        let mut keys: Vec<Vec<u8>> = vec![b"x_unknown_future_key".to_vec()];
        keys.extend(header.keys().rev().map(<[u8]>::to_vec));
        h.insert(item, ItemHeader::new(keys));
    }
    h
}

#[test]
fn captures_decode_by_name_under_a_scrambled_peer_header() {
    for d in all_directions() {
        let (events, _) = decode_ok(&d.bytes, Chunking::Whole);
        let scrambled = encode_events(&events, &mut Encoder::with_headers(scrambled_headers()));
        let (again, headers) = decode_ok(&scrambled, Chunking::Random(5));
        assert_eq!(normalize(again), normalize(events), "{}", d.name);
        // The unknown 'Z' line was ignored.
        assert!(headers.get(ItemType::from_byte(b'Z')).is_none());
    }
}

#[test]
fn dovecot_24_handshake_without_import_commit_msgs_interval() {
    // Dovecot 2.4.1 dropped `import_commit_msgs_interval` from its H header.
    let mut h24 = Headers::ours();
    let keys: Vec<Vec<u8>> = h24
        .get(ItemType::HANDSHAKE)
        .map(|h| h.keys().filter(|k| *k != b"import_commit_msgs_interval").map(<[u8]>::to_vec).collect())
        .unwrap_or_default();
    h24.insert(ItemType::HANDSHAKE, ItemHeader::new(keys));
    let (events, _) = decode_ok(&all_directions()[0].bytes, Chunking::Whole);
    let bytes = encode_events(&events, &mut Encoder::with_headers(h24));
    let (decoded, _) = decode_ok(&bytes, Chunking::Whole);
    let Some(Event::Record(Record::Handshake(master))) = decoded.get(1) else { panic!("no handshake: {decoded:?}") };
    assert_eq!(master.import_commit_msgs_interval, None);
    assert_eq!(master.hostname.as_bytes(), b"vm");
    assert!(master.send_mail_requests);
}

#[test]
fn capture_contents_are_what_the_spec_says() {
    // A few spot checks that the decoded records mean what §3 and §7 say.
    let dirs = all_directions();
    let (events, _) = decode_ok(&dirs[0].bytes, Chunking::Whole);
    let bodies: Vec<Vec<u8>> = normalize(events)
        .into_iter()
        .filter_map(|e| match e {
            Event::BodyChunk(c) => Some(c.into_bytes()),
            _ => None,
        })
        .collect();
    assert_eq!(bodies.len(), 2);
    assert_eq!(
        bodies.first().map(Vec::as_slice),
        Some(&b"From: a@example.com\nSubject: first\nMessage-ID: <m1@example.com>\n\nHello one.\n.dot line\n"[..])
    );
    // raw-dot: the content starting with a dot arrives stuffed (Debian's CVE fix) and decodes.
    let (events, _) = decode_ok(&dirs[2].bytes, Chunking::Bytewise);
    let body: Vec<u8> = normalize(events)
        .into_iter()
        .find_map(|e| match e {
            Event::BodyChunk(c) => Some(c.into_bytes()),
            _ => None,
        })
        .unwrap_or_default();
    assert_eq!(body, b".starts with dot\nX: y\n\nbody\n.\n..two\n");
}

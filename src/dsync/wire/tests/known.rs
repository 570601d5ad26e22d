//! Known answers from the protocol document (§3, §7) and the error cases of the decoder.

use std::num::{NonZeroU8, NonZeroU32};

use super::super::{
    Attribute, AttributeType, AttributeValue, CacheDecision, CacheDecisionKind, CacheField, ChangeType, Decoder,
    DecoderLimits, Deletion, Encoder, Event, Existence, Finish, Guid128, Handshake, Headers, HierarchySep,
    Incompatibility, Inside, ItemType, KeywordChange, KeywordOp, Limited, LineNo, Mail, MailChange, MailRequest,
    Mailbox, MailboxDeletes, MailboxNode, MailboxPath, MailboxState, Malformation, Misuse, Record, SyncType, Text,
    WireError, WireFlags,
};
use super::{Chunking, decode_ok, decode_with};

fn t(s: &str) -> Text {
    Text::try_from(s).unwrap()
}

fn g(s: &str) -> Guid128 {
    Guid128::parse_hex(s.as_bytes()).unwrap()
}

/// Decode one line (no LF) by Dovecot's own headers from a 3.5 peer.
fn decode(line: &[u8]) -> Record {
    Record::decode(line, &Headers::ours(), 5).unwrap_or_else(|e| panic!("{}: {e}", line.escape_ascii()))
}

fn decode_err(line: &[u8]) -> WireError {
    Record::decode(line, &Headers::ours(), 5).unwrap_err()
}

fn encode(record: &Record) -> Vec<u8> {
    let mut out = Vec::new();
    record.encode(&Headers::ours(), &mut out).unwrap();
    out
}

/// The line decodes to `record` and `record` encodes to the line (plus LF).
fn known(line: &[u8], record: Record) {
    assert_eq!(decode(line), record, "{}", line.escape_ascii());
    let mut expected = line.to_vec();
    expected.push(b'\n');
    assert_eq!(encode(&record).escape_ascii().to_string(), expected.escape_ascii().to_string());
}

const MASTER_H: &[u8] = b"Hvm\t\x02\t\x02\t\x02\tc\t\x02\t\x02\t\x02\t\t\x02\t\x02\t\x02\t\x02\t\x02\t\x02\t\x02\t\x02\t\x02\t\x02\t\x02\t\x02\t\x02\t100\tDate\x01tMessage-ID\x01t\t_";

#[test]
fn master_handshake() {
    known(
        MASTER_H,
        Record::from(Handshake {
            hostname: t("vm"),
            sync_type: Some(SyncType::Changed),
            send_mail_requests: true,
            import_commit_msgs_interval: NonZeroU32::new(100),
            hashed_headers: Some(vec![t("Date"), t("Message-ID")]),
            alt_char: NonZeroU8::new(b'_'),
            ..Default::default()
        }),
    );
}

#[test]
fn slave_handshake_with_22_nulls() {
    let mut line = b"Hvm".to_vec();
    for _ in 0..22 {
        line.extend_from_slice(b"\t\x02");
    }
    line.push(b'\t');
    known(&line, Record::from(Handshake { hostname: t("vm"), hashed_headers: Some(vec![]), ..Default::default() }));
}

#[test]
fn handshake_options() {
    let h = Handshake {
        hostname: t("host.example"),
        sync_ns_prefixes: Some(super::super::NsPrefixes::new(vec![t(""), t("shared/")]).unwrap()),
        sync_box: Some(t("\\Sent")),
        sync_box_guid: Some(g("7a78240e5db30a6b9767000083ecc375")),
        sync_type: Some(SyncType::State),
        debug: true,
        exclude_mailboxes: Some(vec![t("Trash"), t("Tab\tbed*")]),
        backup_recv: true,
        lock_timeout: NonZeroU32::new(30),
        sync_since_timestamp: std::num::NonZeroI64::new(1_700_000_000),
        sync_until_timestamp: std::num::NonZeroI64::new(1_800_000_000),
        sync_max_size: std::num::NonZeroU64::new(1 << 20),
        sync_flags: Some(t("-\\Deleted")),
        virtual_all_box: Some(t("Virtual/All")),
        empty_hdr_workaround: true,
        hashed_headers: Some(vec![t("Date")]),
        ..Default::default()
    };
    let line = encode(&Record::from(h.clone()));
    // The namespace list is LF-joined, so the LF travels escaped.
    assert!(line.windows(9).any(|w| w == b"\x01nshared/"));
    assert_eq!(decode(line.strip_suffix(b"\n").unwrap()), Record::from(h));
}

#[test]
fn handshake_rejects_what_dovecot_rejects() {
    let header = Headers::ours();
    let pos = |k: &str| header.get(ItemType::HANDSHAKE).and_then(|h| h.position(k)).unwrap();
    let with = |key: &str, value: &[u8]| {
        let mut values: Vec<Vec<u8>> = vec![b"\x02".to_vec(); pos(key) + 1];
        values[0] = b"vm".to_vec();
        values[pos(key)] = value.to_vec();
        let mut line = b"H".to_vec();
        line.extend_from_slice(&values.join(&b'\t'));
        Record::decode(&line, &header, 5)
    };
    for (key, value) in [
        ("sync_type", &b"x"[..]),
        ("sync_type", b""),
        ("lock_timeout", b"0"),
        ("lock_timeout", b"abc"),
        ("import_commit_msgs_interval", b"0"),
        ("sync_since_timestamp", b"0"),
        ("sync_max_size", b"0"),
        ("sync_box_guid", b"123"),
    ] {
        assert!(matches!(with(key, value), Err(WireError::Malformed { .. })), "{key}={value:?}");
    }
    // Only the first letter of sync_type counts; alt_char takes the first byte, empty is none.
    let Ok(Record::Handshake(h)) = with("sync_type", b"full") else { panic!() };
    assert_eq!(h.sync_type, Some(SyncType::Full));
    let Ok(Record::Handshake(h)) = with("alt_char", b"") else { panic!() };
    assert_eq!(h.alt_char, None);
    // hostname is required.
    assert!(matches!(
        Record::decode(b"H\x02", &header, 5),
        Err(WireError::Malformed { problem: Malformation::MissingRequiredField, .. })
    ));
}

#[test]
fn mailbox_state() {
    known(
        b"Sd42a051608b20a6bc63a000083ecc375\t1795863048\t2\t1\t0\t2",
        Record::MailboxState(MailboxState {
            mailbox_guid: g("d42a051608b20a6bc63a000083ecc375"),
            last_uidvalidity: 1_795_863_048,
            last_common_uid: 2,
            last_common_modseq: 1,
            last_common_pvt_modseq: 0,
            last_messages_count: 2,
            changes_during_sync: false,
        }),
    );
    // Required numbers must be present and valid; last_messages_count may be missing.
    assert!(
        matches!(decode(b"Sd42a051608b20a6bc63a000083ecc375\t1\t2\t3\t4"), Record::MailboxState(s) if s.last_messages_count == 0)
    );
    assert!(matches!(
        decode_err(b"Sd42a051608b20a6bc63a000083ecc375\t1\t2\t3"),
        WireError::Malformed { problem: Malformation::MissingRequiredField, .. }
    ));
    assert!(matches!(
        decode_err(b"Sd42a051608b20a6bc63a000083ecc37\t1\t2\t3\t4"),
        WireError::Malformed { problem: Malformation::InvalidGuid(_), .. }
    ));
    assert!(matches!(
        decode_err(b"Sd42a051608b20a6bc63a000083ecc375\t4294967296\t2\t3\t4"),
        WireError::Malformed { problem: Malformation::InvalidNumber(_), .. }
    ));
}

#[test]
fn mailbox_nodes() {
    let node = |name: &[&str]| MailboxPath::new(name.iter().map(|c| t(c)).collect()).unwrap();
    known(
        b"NINBOX\ty\td42a051608b20a6bc63a000083ecc375\t1795863048\t3",
        Record::MailboxNode(MailboxNode {
            name: node(&["INBOX"]),
            existence: Existence::Exists,
            mailbox_guid: Some(g("d42a051608b20a6bc63a000083ecc375")),
            uid_validity: 1_795_863_048,
            uid_next: 3,
            last_renamed_or_created: 0,
            subscribed: false,
            last_subscription_change: 0,
        }),
    );
    known(
        b"NArchive\tn",
        Record::MailboxNode(MailboxNode {
            name: node(&["Archive"]),
            existence: Existence::Nonexistent,
            mailbox_guid: None,
            uid_validity: 0,
            uid_next: 0,
            last_renamed_or_created: 0,
            subscribed: false,
            last_subscription_change: 0,
        }),
    );
    known(
        b"NArchive\x01t2024\ty\te94843333cb20a6b4247000083ecc375\t1795863049\t1\t\x02\t\t1795863100",
        Record::MailboxNode(MailboxNode {
            name: node(&["Archive", "2024"]),
            existence: Existence::Exists,
            mailbox_guid: Some(g("e94843333cb20a6b4247000083ecc375")),
            uid_validity: 1_795_863_049,
            uid_next: 1,
            last_renamed_or_created: 0,
            subscribed: true,
            last_subscription_change: 1_795_863_100,
        }),
    );
    // Subscription only, with a TAB inside a component.
    known(
        b"NTab\x011tName\tn\t\x02\t\x02\t\x02\t\x02\t\t1795863100",
        Record::MailboxNode(MailboxNode {
            name: node(&["Tab\tName"]),
            existence: Existence::Nonexistent,
            mailbox_guid: None,
            uid_validity: 0,
            uid_next: 0,
            last_renamed_or_created: 0,
            subscribed: true,
            last_subscription_change: 1_795_863_100,
        }),
    );
    assert!(matches!(decode_err(b"N\tn"), WireError::Malformed { problem: Malformation::EmptyName, .. }));
    // An unknown existence letter reads as "nonexistent", as in Dovecot.
    assert!(matches!(decode(b"Nx\tq"), Record::MailboxNode(n) if n.existence == Existence::Nonexistent));
}

#[test]
fn mailbox_deletes() {
    known(
        b"D.\t%",
        Record::MailboxDeletes(MailboxDeletes {
            hierarchy_sep: HierarchySep::new(b'.').unwrap(),
            escape_char: NonZeroU8::new(b'%'),
            mailboxes: vec![],
            dirs: vec![],
            unsubscribes: vec![],
        }),
    );
    known(
        b"D.\t%\t3fdd40373cb20a6b4747000083ecc375 1795863100\te3bf62bb7f5af7ba291b2df1a11d573b 1795863100",
        Record::MailboxDeletes(MailboxDeletes {
            hierarchy_sep: HierarchySep::new(b'.').unwrap(),
            escape_char: NonZeroU8::new(b'%'),
            mailboxes: vec![Deletion { guid: g("3fdd40373cb20a6b4747000083ecc375"), timestamp: 1_795_863_100 }],
            dirs: vec![Deletion { guid: g("e3bf62bb7f5af7ba291b2df1a11d573b"), timestamp: 1_795_863_100 }],
            unsubscribes: vec![],
        }),
    );
    // No escape char is sent as an empty value.
    known(
        b"D/\t",
        Record::MailboxDeletes(MailboxDeletes {
            hierarchy_sep: HierarchySep::new(b'/').unwrap(),
            escape_char: None,
            mailboxes: vec![],
            dirs: vec![],
            unsubscribes: vec![],
        }),
    );
    for bad in [&b"D..\t%"[..], b"D\t%", b"D.\t%%", b"D.\t%\t3fdd40373cb20a6b4747000083ecc375", b"D.\t%\t3fdd 1"] {
        assert!(matches!(decode_err(bad), WireError::Malformed { .. }), "{}", bad.escape_ascii());
    }
}

#[test]
fn mailbox_with_cache_fields() {
    let cache = |name: &str, last_used| CacheField {
        name: t(name),
        decision: CacheDecision { kind: CacheDecisionKind::Temp, forced: false },
        last_used,
    };
    known(
        b"Bd42a051608b20a6bc63a000083ecc375\t1795863048\t3\t2\t1\t4\t0\t\x02\t\x02\tflags\x01tt\x01t1795863048\x01ndate.save\x01tt\x01t1795863048\x01nmime.parts\x01tt\x01t1795863048\t\t",
        Record::Mailbox(Mailbox {
            mailbox_guid: g("d42a051608b20a6bc63a000083ecc375"),
            uid_validity: 1_795_863_048,
            uid_next: 3,
            messages_count: 2,
            first_recent_uid: 1,
            highest_modseq: 4,
            highest_pvt_modseq: 0,
            mailbox_lost: false,
            mailbox_ignore: false,
            cache_fields: vec![
                cache("flags", 1_795_863_048),
                cache("date.save", 1_795_863_048),
                cache("mime.parts", 1_795_863_048),
            ],
            have_guids: true,
            have_save_guids: true,
            have_only_guid128: false,
        }),
    );
    // The slave's reply: one cache field without last_used (trailing field omitted).
    let Record::Mailbox(b) =
        decode(b"Bd42a051608b20a6bc63a000083ecc375\t1795863048\t1\t0\t1\t1\t0\t\x02\t\x02\tflags\x01tt\t\t")
    else {
        panic!()
    };
    assert_eq!(b.cache_fields, vec![cache("flags", 0)]);
    // A lost mailbox: GUID, zeros, mailbox_lost, empty cache fields.
    known(
        b"Bd42a051608b20a6bc63a000083ecc375\t0\t0\t0\t0\t0\t0\t\t\x02\t",
        Record::Mailbox(Mailbox {
            mailbox_guid: g("d42a051608b20a6bc63a000083ecc375"),
            mailbox_lost: true,
            ..Default::default()
        }),
    );
    // Forced decisions, and bad cache records.
    let Record::Mailbox(b) =
        decode(b"Bd42a051608b20a6bc63a000083ecc375\t1\t1\t0\t1\t1\t0\t\x02\t\x02\tx\x01tyF\x01ny\x01tnF")
    else {
        panic!()
    };
    assert_eq!(b.cache_fields.len(), 2);
    assert_eq!(
        b.cache_fields.first().map(|c| c.decision),
        Some(CacheDecision { kind: CacheDecisionKind::Yes, forced: true })
    );
    for bad in [
        &b"Bd42a051608b20a6bc63a000083ecc375\t1\t1\t0\t1\t1\t0\t\x02\t\x02\tx\x01tq"[..],
        b"Bd42a051608b20a6bc63a000083ecc375\t1\t1\t0\t1\t1\t0\t\x02\t\x02\tx\x01tt\x01n",
        b"Bd42a051608b20a6bc63a000083ecc375\t1\t1\t0\t1\t1\t0\t\x02\t\x02\tx",
        b"Bd42a051608b20a6bc63a000083ecc375\t1\t1\t0\t1\t1",
    ] {
        assert!(matches!(decode_err(bad), WireError::Malformed { .. }), "{}", bad.escape_ascii());
    }
}

#[test]
fn have_save_guids_is_implied_below_minor_2() {
    let line = b"Bd42a051608b20a6bc63a000083ecc375\t1\t1\t0\t1\t1\t0\t\x02\t\x02\t\t";
    let Ok(Record::Mailbox(old)) = Record::decode(line, &Headers::ours(), 1) else { panic!() };
    assert!(old.have_guids && old.have_save_guids);
    let Ok(Record::Mailbox(new)) = Record::decode(line, &Headers::ours(), 2) else { panic!() };
    assert!(new.have_guids && !new.have_save_guids);
}

#[test]
fn mail_changes() {
    // §2.4: only 9 values, the trailing ones omitted.
    known(
        b"Cf\t1\t1795863048.M369139P15046.vm,S=153,W=161\t\x02\t7\t\x02\t1\t\x02\t29",
        Record::MailChange(MailChange {
            change_type: ChangeType::FlagChange,
            uid: 1,
            guid: Some(t("1795863048.M369139P15046.vm,S=153,W=161")),
            hdr_hash: None,
            modseq: 7,
            pvt_modseq: 0,
            add_flags: WireFlags(WireFlags::ANSWERED),
            remove_flags: WireFlags(0),
            final_flags: WireFlags(WireFlags::ANSWERED | WireFlags::SEEN | WireFlags::RECENT),
            keywords_reset: false,
            keyword_changes: vec![],
            received_timestamp: 0,
            virtual_size: 0,
        }),
    );
    known(
        b"Cs\t1\t1795863048.M369139P15046.vm,S=153,W=161\t\x02\t4\t\x02\t8\t\x02\t28\t\x02\t\x02\t\x02\tffffffffffffffff",
        Record::MailChange(MailChange {
            change_type: ChangeType::Save,
            uid: 1,
            guid: Some(t("1795863048.M369139P15046.vm,S=153,W=161")),
            hdr_hash: None,
            modseq: 4,
            pvt_modseq: 0,
            add_flags: WireFlags(WireFlags::SEEN),
            remove_flags: WireFlags(0),
            final_flags: WireFlags(0x28),
            keywords_reset: false,
            keyword_changes: vec![],
            received_timestamp: 0,
            virtual_size: u64::MAX,
        }),
    );
    known(
        b"Cf\t1\t1795863048.M369139P15046.vm,S=153,W=161\t\x02\t8\t\x02\t2\t\x02\t2a\t\x02\t&$Label1",
        Record::MailChange(MailChange {
            change_type: ChangeType::FlagChange,
            uid: 1,
            guid: Some(t("1795863048.M369139P15046.vm,S=153,W=161")),
            hdr_hash: None,
            modseq: 8,
            pvt_modseq: 0,
            add_flags: WireFlags(2),
            remove_flags: WireFlags(0),
            final_flags: WireFlags(0x2a),
            keywords_reset: false,
            keyword_changes: vec![KeywordChange { op: KeywordOp::AddAndFinal, keyword: t("$Label1") }],
            received_timestamp: 0,
            virtual_size: 0,
        }),
    );
    known(
        b"Ce\t2\t5eb09b67f3b8d2a48ecaff04748ea450",
        Record::MailChange(MailChange {
            change_type: ChangeType::Expunge,
            uid: 2,
            guid: Some(t("5eb09b67f3b8d2a48ecaff04748ea450")),
            hdr_hash: None,
            modseq: 0,
            pvt_modseq: 0,
            add_flags: WireFlags(0),
            remove_flags: WireFlags(0),
            final_flags: WireFlags(0),
            keywords_reset: false,
            keyword_changes: vec![],
            received_timestamp: 0,
            virtual_size: 0,
        }),
    );
    // All four keyword operations, header hash "", received timestamp in hex.
    known(
        b"Cs\t9\t\t\t3\t\x02\t\x02\t\x02\t\x02\t\t+a\x01t-b\x01t=c\x01t&d\t65a0bc00",
        Record::MailChange(MailChange {
            change_type: ChangeType::Save,
            uid: 9,
            guid: Some(t("")),
            hdr_hash: Some(t("")),
            modseq: 3,
            pvt_modseq: 0,
            add_flags: WireFlags(0),
            remove_flags: WireFlags(0),
            final_flags: WireFlags(0),
            keywords_reset: true,
            keyword_changes: vec![
                KeywordChange { op: KeywordOp::Add, keyword: t("a") },
                KeywordChange { op: KeywordOp::Remove, keyword: t("b") },
                KeywordChange { op: KeywordOp::Final, keyword: t("c") },
                KeywordChange { op: KeywordOp::AddAndFinal, keyword: t("d") },
            ],
            received_timestamp: 0x65a0_bc00,
            virtual_size: 0,
        }),
    );
    // Hex flags above 0xff, decimal garbage and unknown types are refused.
    for bad in [&b"Cf\t1\tg\t\x02\t1\t\x02\t100"[..], b"Cx\t1", b"C\t1", b"Cs\t-1", b"Cs\t1\tg\t\x02\tz"] {
        assert!(matches!(decode_err(bad), WireError::Malformed { .. }), "{}", bad.escape_ascii());
    }
    // Unknown keyword operations are dropped, as Dovecot's importer ignores them.
    let Record::MailChange(c) = decode(b"Cf\t1\tg\t\x02\t\x02\t\x02\t\x02\t\x02\t\x02\t\x02\t?x\x01t\x01t+y") else {
        panic!()
    };
    assert_eq!(c.keyword_changes, vec![KeywordChange { op: KeywordOp::Add, keyword: t("y") }]);
}

#[test]
fn requests_mails_finish() {
    known(
        b"R1795863048.M453288P15048.vm,S=136,W=143\t2",
        Record::MailRequest(MailRequest { guid: Some(t("1795863048.M453288P15048.vm,S=136,W=143")), uid: 2 }),
    );
    known(b"R\x02\t7", Record::MailRequest(MailRequest { guid: None, uid: 7 }));
    known(
        b"M1795863048.M369139P15046.vm,S=153,W=161\t\x02\t\t\x02\t1795863048\t1795863048\t",
        Record::Mail(Mail {
            guid: Some(t("1795863048.M369139P15046.vm,S=153,W=161")),
            uid: 0,
            pop3_uidl: Some(t("")),
            pop3_order: 0,
            received_date: 1_795_863_048,
            saved_date: 1_795_863_048,
            stream: true,
        }),
    );
    // Expunged on the sender: guid, no stream.
    known(b"Mabc", Record::Mail(Mail { guid: Some(t("abc")), ..Default::default() }));
    known(b"F", Record::Finish(Finish::default()));
    known(
        b"Fdsync failed\t1\t",
        Record::Finish(Finish { error: Some(t("dsync failed")), mail_error: 1, require_full_resync: true }),
    );
}

#[test]
fn attributes() {
    known(
        b"Ap\tvendor/vendor.dovecot/x\tsmall\x01tvalue\t\x02\t\t1795863100\t5",
        Record::Attribute(Attribute {
            attr_type: AttributeType::Private,
            key: t("vendor/vendor.dovecot/x"),
            value: AttributeValue::Inline(t("small\tvalue")),
            deleted: true,
            last_change: 1_795_863_100,
            modseq: 5,
        }),
    );
    known(
        b"As\tk\t\x02\t",
        Record::Attribute(Attribute {
            attr_type: AttributeType::Shared,
            key: t("k"),
            value: AttributeValue::Stream,
            deleted: false,
            last_change: 0,
            modseq: 0,
        }),
    );
    // Both value and stream: the stream wins, as in Dovecot.
    assert!(matches!(decode(b"As\tk\tv\t"), Record::Attribute(a) if a.value == AttributeValue::Stream));
    assert!(matches!(decode_err(b"Ax\tk"), WireError::Malformed { problem: Malformation::UnknownChoice(_), .. }));
}

#[test]
fn value_starting_with_null_chr_gets_another() {
    known(b"R\x02\x02odd", Record::MailRequest(MailRequest { guid: Some(t("\x02odd")), uid: 0 }));
    known(b"R\x02\x02", Record::MailRequest(MailRequest { guid: Some(t("\x02")), uid: 0 }));
}

#[test]
fn hashed_headers_trailing_tab() {
    // `Date<01>tMessage-ID<01>t` is the names each followed by TAB.
    let Record::Handshake(h) = decode(b"Hx\t\x02\t\x02\t\x02\t\x02\t\x02\t\x02\t\x02\t\x02\t\x02\t\x02\t\x02\t\x02\t\x02\t\x02\t\x02\t\x02\t\x02\t\x02\t\x02\t\x02\t\x02\t\x02\tDate\x01tMessage-ID\x01t")
    else {
        panic!()
    };
    assert_eq!(h.hashed_headers, Some(vec![t("Date"), t("Message-ID")]));
}

/// A full greeting of ours followed by `lines`.
fn stream(lines: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    Encoder::new().greeting(&mut out);
    out.extend_from_slice(lines);
    out
}

fn first_error(bytes: &[u8]) -> WireError {
    let (result, mut dec) = decode_with(bytes, Chunking::Whole, DecoderLimits::default());
    let err = result.expect_err("expected an error");
    // Afterwards the decoder stays failed.
    assert_eq!(dec.next(), Err(WireError::Misuse(Misuse::DecoderFailed)));
    err
}

#[test]
fn decoder_error_cases() {
    // 22 lines of greeting: VERSION + 11 headers + "." = 13 lines; the next line is 14.
    assert!(matches!(
        first_error(&stream(b"\n")),
        WireError::Malformed { at: LineNo(Some(14)), problem: Malformation::EmptyLine, .. }
    ));
    assert!(matches!(
        first_error(&stream(b"Qwhat\n")),
        WireError::Malformed { problem: Malformation::UnknownRecordType('Q'), .. }
    ));
    assert!(matches!(
        first_error(&stream(b"cflags\tt\n")),
        WireError::Malformed { problem: Malformation::UnexpectedRecordType(ItemType::CACHE_FIELD), .. }
    ));
    assert!(matches!(
        first_error(&stream(b"F\nMg\t\x02\t\t\x02\t1\t1\t\nbody")),
        WireError::Truncated { inside: Inside::Body, .. }
    ));
    assert!(matches!(
        first_error(&stream(b"F\nR1\t2")),
        WireError::Truncated { at: LineNo(Some(15)), inside: Inside::Line }
    ));
    assert!(matches!(first_error(b"VERSION\tdsync\t3\t5\nH"), WireError::Truncated { inside: Inside::Greeting, .. }));
    assert!(matches!(first_error(b""), WireError::Truncated { inside: Inside::Greeting, .. }));
    assert!(matches!(
        first_error(b"VERSION\tdsync\t2\t0\n"),
        WireError::Incompatible { at: LineNo(Some(1)), problem: Incompatibility::MajorVersion(2) }
    ));
    assert!(matches!(
        first_error(b"VERSION\tdsync\t3\t5\nHhostname\n.\n"),
        WireError::Incompatible {
            at: LineNo(Some(3)),
            problem: Incompatibility::MissingHeader(ItemType::MAILBOX_STATE)
        }
    ));
    assert!(matches!(
        first_error(b"VERSION\tdsync\t3\t5\nHfoo\n"),
        WireError::Incompatible { problem: Incompatibility::HeaderLacksRequiredKey { key: "hostname", .. }, .. }
    ));
    // A record of a type whose header a minor-0 peer need not send.
    let mut old = b"VERSION\tdsync\t3\t0\n".to_vec();
    for (item, header) in Headers::ours().iter() {
        if item != ItemType::ATTRIBUTE && item != ItemType::FINISH {
            old.push(item.as_byte());
            old.extend_from_slice(&super::super::escape::join_tabescaped(header.keys()));
            old.push(b'\n');
        }
    }
    old.extend_from_slice(b".\nF\n");
    assert!(matches!(
        first_error(&old),
        WireError::Malformed { problem: Malformation::RecordWithoutHeader(ItemType::FINISH), .. }
    ));
}

#[test]
fn line_limit_is_enforced_before_the_line_ends() {
    let limits = DecoderLimits { max_line_len: 64, max_body_chunk: 16 };
    let mut bytes = b"VERSION\tdsync\t3\t5\n".to_vec();
    bytes.extend(std::iter::repeat_n(b'x', 65));
    let (result, _) = decode_with(&bytes, Chunking::Bytewise, limits);
    assert!(matches!(result, Err(WireError::LimitExceeded { at: LineNo(Some(2)), what: Limited::Line, limit: 64 })));
    // A line exactly at the limit is fine, one byte more is not.
    let bytes = stream(b"R\x02\t1\n");
    let longest = bytes.split(|&b| b == b'\n').map(<[u8]>::len).max().unwrap_or(0);
    let limits = |max_line_len| DecoderLimits { max_line_len, max_body_chunk: 1 };
    assert!(decode_with(&bytes, Chunking::Whole, limits(longest)).0.is_ok());
    assert!(matches!(
        decode_with(&bytes, Chunking::Random(3), limits(longest - 1)).0,
        Err(WireError::LimitExceeded { at: LineNo(Some(2)), .. })
    ));
}

#[test]
fn done_ends_everything_and_crlf_lines_are_accepted() {
    let (events, _) = decode_ok(&stream(b"F\r\nX\nanything \x00 at all\n"), Chunking::Bytewise);
    assert_eq!(events.last(), Some(&Event::Done));
    assert_eq!(events.get(1), Some(&Event::Record(Record::Finish(Finish::default()))));
}

#[test]
fn nul_in_a_line_cuts_it_like_dovecot() {
    let (events, _) = decode_ok(&stream(b"R7\x00\tjunk\n"), Chunking::Whole);
    assert_eq!(events.get(1), Some(&Event::Record(Record::MailRequest(MailRequest { guid: Some(t("7")), uid: 0 }))));
}

#[test]
fn large_body_streams_in_bounded_chunks() {
    let limits = DecoderLimits { max_line_len: 1 << 20, max_body_chunk: 32 << 10 };
    let mut content = Vec::new();
    let mut i = 0u32;
    while content.len() < (4 << 20) {
        content.extend_from_slice(format!(".line {i} with a leading dot\r\n").as_bytes());
        i += 1;
    }
    let mut enc = Encoder::new();
    let mut wire = Vec::new();
    enc.greeting(&mut wire);
    enc.record(&Record::Mail(Mail { guid: Some(t("g")), stream: true, ..Default::default() }), &mut wire).unwrap();
    // Unfinished body: encoding anything else is refused.
    assert_eq!(enc.end_of_list(&mut wire), Err(WireError::Misuse(Misuse::BodyOpen)));
    enc.body_chunk(&content, &mut wire).unwrap();
    enc.body_end(&mut wire).unwrap();
    enc.end_of_list(&mut wire).unwrap();
    assert_eq!(enc.body_end(&mut wire), Err(WireError::Misuse(Misuse::NoBodyOpen)));

    let mut dec = Decoder::with_limits(limits);
    let mut body = Vec::new();
    let mut saw_end = false;
    let mut max_buffered = 0;
    for piece in wire.chunks(64 << 10) {
        dec.feed(piece);
        max_buffered = max_buffered.max(dec.buffered());
        while let Some(event) = dec.next().unwrap() {
            match event {
                Event::BodyChunk(c) => {
                    assert!(c.len() <= limits.max_body_chunk + 2);
                    body.extend_from_slice(c.declassify());
                }
                Event::BodyEnd => saw_end = true,
                _ => {}
            }
        }
    }
    assert!(saw_end);
    assert!(body == content);
    assert!(max_buffered <= 64 << 10);
    assert_eq!(dec.buffered(), 0);
}

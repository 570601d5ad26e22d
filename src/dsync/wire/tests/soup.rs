//! Stable-Rust stand-ins for the fuzz targets: deterministic pseudo-random inputs that must
//! never panic, and pseudo-random valid records that must decode to themselves.

use std::num::{NonZeroI64, NonZeroU8, NonZeroU32, NonZeroU64};

use super::super::{
    Attribute, AttributeType, AttributeValue, CacheDecision, CacheDecisionKind, CacheField, ChangeType, DecoderLimits,
    Deletion, Encoder, Event, Existence, Finish, Guid128, Handshake, HierarchySep, KeywordChange, KeywordOp, Mail,
    MailChange, MailRequest, Mailbox, MailboxDeletes, MailboxNode, MailboxPath, MailboxState, NsPrefixes, Record,
    SyncType, Text, WireFlags, decode_state,
};
use super::captures::all_directions;
use super::{Chunking, Rng, decode_ok, decode_with, normalize};

/// Bytes that matter to the codec, to make random input hit interesting paths.
const SPICE: &[u8] = b"\t\n\r.\x01\x02\x00XHSNDBACRMFc0123456789abcdef tnrsyfe&+-=";

fn random_bytes(rng: &mut Rng, len: usize) -> Vec<u8> {
    (0..len)
        .map(
            |_| {
                if rng.chance(2) {
                    SPICE.get(rng.below(SPICE.len())).copied().unwrap_or(0)
                } else {
                    rng.next_u64() as u8
                }
            },
        )
        .collect()
}

/// Run the decoder over `bytes` in random chunks; any result but a panic is fine.
fn churn(bytes: &[u8], seed: u64) {
    let limits = DecoderLimits { max_line_len: 512, max_body_chunk: 7 };
    let _ = decode_with(bytes, Chunking::Random(seed), limits);
    let _ = decode_state(&String::from_utf8_lossy(bytes));
}

#[test]
fn byte_soup_never_panics() {
    let mut rng = Rng::new(0x5eed);
    let mut greeting = Vec::new();
    Encoder::new().greeting(&mut greeting);
    for round in 0..400u64 {
        let len = rng.below(300);
        let soup = random_bytes(&mut rng, len);
        churn(&soup, round);
        // Behind a valid greeting, the soup reaches the record decoders and bodies.
        let mut after_greeting = greeting.clone();
        after_greeting.extend_from_slice(&soup);
        churn(&after_greeting, round);
        let mut with_body = greeting.clone();
        with_body.extend_from_slice(b"Mg\t\x02\t\t\x02\t1\t1\t\n");
        with_body.extend_from_slice(&soup);
        churn(&with_body, round);
    }
}

#[test]
fn mutated_captures_never_panic() {
    let mut rng = Rng::new(0xcafe);
    let captures = all_directions();
    for round in 0..150u64 {
        let Some(base) = captures.get(rng.below(captures.len())) else { continue };
        let mut bytes = base.bytes.clone();
        for _ in 0..1 + rng.below(4) {
            if bytes.is_empty() {
                break;
            }
            let at = rng.below(bytes.len());
            match rng.below(3) {
                0 => {
                    if let Some(b) = bytes.get_mut(at) {
                        *b = SPICE.get(rng.below(SPICE.len())).copied().unwrap_or(0);
                    }
                }
                1 => {
                    bytes.remove(at);
                }
                _ => bytes.insert(at, rng.next_u64() as u8),
            }
        }
        churn(&bytes, round);
    }
}

fn text(rng: &mut Rng) -> Text {
    let len = rng.below(8);
    let bytes: Vec<u8> = random_bytes(rng, len).into_iter().filter(|&b| b != 0).collect();
    Text::new(bytes).unwrap_or_default()
}

fn nonempty_text(rng: &mut Rng) -> Text {
    let t = text(rng);
    if t.is_empty() { Text::try_from("x").unwrap_or_default() } else { t }
}

fn guid(rng: &mut Rng) -> Guid128 {
    let mut b = [0u8; 16];
    for x in &mut b {
        *x = rng.next_u64() as u8;
    }
    Guid128::from_bytes(b)
}

fn maybe<T>(rng: &mut Rng, f: impl FnOnce(&mut Rng) -> T) -> Option<T> {
    if rng.chance(2) { Some(f(rng)) } else { None }
}

fn list<T>(rng: &mut Rng, max: usize, mut f: impl FnMut(&mut Rng) -> T) -> Vec<T> {
    let n = rng.below(max + 1);
    (0..n).map(|_| f(rng)).collect()
}

fn time(rng: &mut Rng) -> i64 {
    if rng.chance(3) { 0 } else { (rng.next_u64() >> 2) as i64 }
}

/// A random record that can be encoded and read back unchanged.
fn random_record(rng: &mut Rng) -> Record {
    match rng.below(10) {
        0 => Record::from(Handshake {
            hostname: text(rng),
            sync_ns_prefixes: maybe(rng, |r| {
                let mut prefixes = list(r, 3, |r| {
                    Text::new(text(r).into_bytes().into_iter().filter(|&b| b != b'\n').collect::<Vec<_>>())
                        .unwrap_or_default()
                });
                if prefixes.is_empty() {
                    prefixes.push(Text::empty());
                }
                NsPrefixes::new(prefixes)
                    .unwrap_or_else(|_| NsPrefixes::new(vec![Text::empty()]).unwrap_or_else(|_| unreachable!()))
            }),
            sync_box: maybe(rng, text),
            sync_box_guid: maybe(rng, guid),
            sync_type: maybe(rng, |r| [SyncType::Full, SyncType::Changed, SyncType::State][r.below(3)]),
            debug: rng.chance(2),
            sync_visible_namespaces: rng.chance(2),
            // A single empty pattern cannot travel (it reads back as no patterns).
            exclude_mailboxes: maybe(rng, |r| list(r, 3, nonempty_text)),
            send_mail_requests: rng.chance(2),
            backup_send: rng.chance(2),
            backup_recv: rng.chance(2),
            lock_timeout: NonZeroU32::new(rng.next_u64() as u32),
            no_mail_sync: rng.chance(2),
            no_backup_overwrite: rng.chance(2),
            purge_remote: rng.chance(2),
            no_notify: rng.chance(2),
            sync_since_timestamp: NonZeroI64::new(time(rng)),
            sync_max_size: NonZeroU64::new(rng.next_u64()),
            sync_flags: maybe(rng, text),
            sync_until_timestamp: NonZeroI64::new(time(rng)),
            virtual_all_box: maybe(rng, text),
            empty_hdr_workaround: rng.chance(2),
            import_commit_msgs_interval: NonZeroU32::new(rng.below(200) as u32),
            hashed_headers: maybe(rng, |r| list(r, 3, text)),
            alt_char: NonZeroU8::new(rng.next_u64() as u8),
        }),
        1 => Record::MailboxState(MailboxState {
            mailbox_guid: guid(rng),
            last_uidvalidity: rng.next_u64() as u32,
            last_common_uid: rng.next_u64() as u32,
            last_common_modseq: rng.next_u64(),
            last_common_pvt_modseq: rng.next_u64(),
            last_messages_count: rng.next_u64() as u32,
            changes_during_sync: rng.chance(2),
        }),
        2 => Record::MailboxNode(MailboxNode {
            name: MailboxPath::new(std::iter::once(nonempty_text(rng)).chain(list(rng, 3, text)).collect())
                .unwrap_or_else(|_| unreachable!()),
            existence: [Existence::Nonexistent, Existence::Exists, Existence::Deleted][rng.below(3)],
            mailbox_guid: maybe(rng, guid),
            uid_validity: rng.next_u64() as u32,
            uid_next: rng.next_u64() as u32,
            last_renamed_or_created: time(rng),
            subscribed: rng.chance(2),
            last_subscription_change: time(rng),
        }),
        3 => {
            let mut deletion = |r: &mut Rng| Deletion { guid: guid(r), timestamp: time(r) - (1 << 60) };
            Record::MailboxDeletes(MailboxDeletes {
                hierarchy_sep: HierarchySep::new(rng.next_u64() as u8 | 1).unwrap_or_else(|| unreachable!()),
                escape_char: NonZeroU8::new(rng.next_u64() as u8),
                mailboxes: list(rng, 3, &mut deletion),
                dirs: list(rng, 3, &mut deletion),
                unsubscribes: list(rng, 3, &mut deletion),
            })
        }
        4 => Record::Mailbox(Mailbox {
            mailbox_guid: guid(rng),
            uid_validity: rng.next_u64() as u32,
            uid_next: rng.next_u64() as u32,
            messages_count: rng.next_u64() as u32,
            first_recent_uid: rng.next_u64() as u32,
            highest_modseq: rng.next_u64(),
            highest_pvt_modseq: rng.next_u64(),
            mailbox_lost: rng.chance(2),
            mailbox_ignore: rng.chance(2),
            cache_fields: list(rng, 4, |r| CacheField {
                name: text(r),
                decision: CacheDecision {
                    kind: [CacheDecisionKind::No, CacheDecisionKind::Temp, CacheDecisionKind::Yes][r.below(3)],
                    forced: r.chance(2),
                },
                last_used: time(r),
            }),
            have_guids: rng.chance(2),
            have_save_guids: rng.chance(2),
            have_only_guid128: rng.chance(2),
        }),
        5 => Record::Attribute(Attribute {
            attr_type: if rng.chance(2) { AttributeType::Private } else { AttributeType::Shared },
            key: text(rng),
            value: match rng.below(3) {
                0 => AttributeValue::Absent,
                1 => AttributeValue::Inline(text(rng)),
                _ => AttributeValue::Stream,
            },
            deleted: rng.chance(2),
            last_change: time(rng),
            modseq: rng.next_u64(),
        }),
        6 => Record::MailChange(MailChange {
            change_type: [ChangeType::Save, ChangeType::Expunge, ChangeType::FlagChange][rng.below(3)],
            uid: rng.next_u64() as u32,
            guid: maybe(rng, text),
            hdr_hash: maybe(rng, text),
            modseq: rng.next_u64(),
            pvt_modseq: rng.next_u64(),
            add_flags: WireFlags(rng.next_u64() as u8),
            remove_flags: WireFlags(rng.next_u64() as u8),
            final_flags: WireFlags(rng.next_u64() as u8),
            keywords_reset: rng.chance(2),
            keyword_changes: list(rng, 4, |r| KeywordChange {
                op: [KeywordOp::Add, KeywordOp::Remove, KeywordOp::Final, KeywordOp::AddAndFinal][r.below(4)],
                keyword: text(r),
            }),
            received_timestamp: rng.next_u64(),
            virtual_size: rng.next_u64(),
        }),
        7 => Record::MailRequest(MailRequest { guid: maybe(rng, text), uid: rng.next_u64() as u32 }),
        8 => Record::Mail(Mail {
            guid: maybe(rng, text),
            uid: rng.next_u64() as u32,
            pop3_uidl: maybe(rng, text),
            pop3_order: rng.next_u64() as u32,
            received_date: time(rng),
            saved_date: time(rng),
            stream: rng.chance(2),
        }),
        _ => Record::Finish(Finish {
            error: maybe(rng, text),
            mail_error: rng.below(15) as i32,
            require_full_resync: rng.chance(2),
        }),
    }
}

#[test]
fn random_valid_records_decode_to_themselves() {
    let mut rng = Rng::new(42);
    let mut enc = Encoder::new();
    let mut wire = Vec::new();
    let mut expected = vec![Event::Greeting { minor: 5 }];
    enc.greeting(&mut wire);
    for _ in 0..600 {
        let record = random_record(&mut rng);
        enc.record(&record, &mut wire).unwrap_or_else(|e| panic!("{record:?}: {e}"));
        let has_body = record.has_body();
        expected.push(Event::Record(record));
        if has_body {
            let len = rng.below(40);
            let body = random_bytes(&mut rng, len);
            enc.body_chunk(&body, &mut wire).unwrap_or_else(|e| panic!("{e}"));
            enc.body_end(&mut wire).unwrap_or_else(|e| panic!("{e}"));
            if !body.is_empty() {
                expected.push(Event::BodyChunk(super::super::BodyChunk::new(body)));
            }
            expected.push(Event::BodyEnd);
        }
        if rng.chance(5) {
            enc.end_of_list(&mut wire).unwrap_or_else(|e| panic!("{e}"));
            expected.push(Event::EndOfList);
        }
    }
    enc.done(&mut wire).unwrap_or_else(|e| panic!("{e}"));
    expected.push(Event::Done);
    for chunking in [Chunking::Whole, Chunking::Random(3)] {
        let (events, _) = decode_ok(&wire, chunking);
        let events = normalize(events);
        for (i, (got, want)) in events.iter().zip(&expected).enumerate() {
            assert_eq!(got, want, "event {i}");
        }
        assert_eq!(events.len(), expected.len());
    }
}

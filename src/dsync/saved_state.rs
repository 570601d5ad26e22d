//! The state string `sync -s` prints and takes back: Dovecot's format, readable by doveadm.
//!
//! A state names, per mailbox, the last point both ends had in common: a UID and a modseq.
//! Each end looks the modseq up in its own index of its mails. On the master's side two
//! indexes may cover the same Maildir, ours and Dovecot's, each counting modseqs its own way,
//! so one number cannot serve both tools:
//!
//! * ours follows Dovecot's HIGHESTMODSEQ upwards (`store::maildir::dovecot_log`), so a point
//!   doveadm printed is safe in ours, and doveadm's states are taken as they are;
//! * the other way, a point of ours may lie above changes Dovecot has counted since, so a
//!   state doveadm is to use names the store's [`other_index_modseq`] at the sync (the point up
//!   to which Dovecot's changes were all in the mails we sent), or lower.
//!
//! So a mailbox whose master keeps a Dovecot index gets two records: a public one with the
//! lower point, which doveadm uses, and a hidden one with our own point, which doveadm skips
//! (its mailbox GUID matches no mailbox; doveadm drops it from the state it prints) and which
//! spares our next run the changes between the two points. A mailbox without a Dovecot index
//! gets only the hidden record: doveadm then compares it in full, without an error.
//!
//! [`other_index_modseq`]: crate::store::MailboxStatus::other_index_modseq

use std::collections::HashMap;

use super::brain::types::MailboxState;
use super::{convert, wire};
use crate::store::Guid128;

/// XORed into the mailbox GUID of a hidden record.
const HIDDEN_GUID_MASK: [u8; 16] = *b"mailreplica-own.";
/// Set in `last_messages_count` of a hidden record; no mailbox holds 2^31 mails.
const HIDDEN_MARK: u32 = 1 << 31;

/// The state string for `states`.
pub(crate) fn encode(states: &[MailboxState]) -> String {
    let mut records = Vec::with_capacity(states.len() * 2);
    for s in states {
        let own = convert::state_to_wire(s);
        match s.shared_modseq {
            Some(q) => {
                records.push(wire::MailboxState { last_common_modseq: q, ..own });
                if q != s.last_common_modseq {
                    records.push(hide(own));
                }
            }
            None => records.push(hide(own)),
        }
    }
    wire::encode_state(&records)
}

/// The states in a string printed by us or by doveadm.
pub(crate) fn decode(text: &str) -> Result<Vec<MailboxState>, wire::WireError> {
    let mut public: HashMap<Guid128, MailboxState> = HashMap::new();
    let mut own: HashMap<Guid128, MailboxState> = HashMap::new();
    for r in wire::decode_state(text)? {
        if r.last_messages_count & HIDDEN_MARK != 0 {
            let mut r = hide(r);
            r.last_messages_count &= !HIDDEN_MARK;
            let s = convert::state_from_wire(&r);
            own.insert(s.guid, s);
        } else {
            let s = convert::state_from_wire(&r);
            public.insert(s.guid, MailboxState { shared_modseq: Some(s.last_common_modseq), ..s });
        }
    }
    let mut states: Vec<MailboxState> = public
        .into_values()
        .map(|p| match own.remove(&p.guid) {
            // Our own point; the public one is kept for printing the state again.
            Some(o) => MailboxState { shared_modseq: p.shared_modseq, ..o },
            None => p,
        })
        .collect();
    states.extend(own.into_values());
    states.sort_by_key(|s| s.guid);
    Ok(states)
}

/// Hides a record from doveadm (and undoes it: XOR).
fn hide(mut s: wire::MailboxState) -> wire::MailboxState {
    let mut g = s.mailbox_guid.to_bytes();
    for (b, m) in g.iter_mut().zip(HIDDEN_GUID_MASK) {
        *b ^= m;
    }
    s.mailbox_guid = wire::Guid128::from_bytes(g);
    s.last_messages_count |= HIDDEN_MARK;
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(guid: u8, modseq: u64, shared: Option<u64>) -> MailboxState {
        MailboxState {
            guid: Guid128([guid; 16]),
            last_uidvalidity: 1000,
            last_common_uid: 12,
            last_common_modseq: modseq,
            last_common_pvt_modseq: 0,
            last_messages_count: 11,
            changes_during_sync: false,
            shared_modseq: shared,
        }
    }

    #[test]
    fn each_tool_finds_its_own_point() {
        let ours_only = state(1, 40, None);
        let two_points = state(2, 40, Some(25));
        let one_point = state(3, 30, Some(30));
        let text = encode(&[ours_only, two_points, one_point]);
        let raw = wire::decode_state(&text).expect("Dovecot's format");
        assert_eq!(raw.len(), 4);
        // What doveadm sees: only the public records, under their mailboxes' GUIDs.
        let visible: Vec<(Guid128, u64)> = raw
            .iter()
            .map(convert::state_from_wire)
            .filter(|s| [1, 2, 3].contains(&s.guid.0[0]) && s.guid.0.iter().all(|&b| b == s.guid.0[0]))
            .map(|s| (s.guid, s.last_common_modseq))
            .collect();
        assert_eq!(visible.len(), 2, "{visible:?}");
        assert!(visible.contains(&(Guid128([2; 16]), 25)) && visible.contains(&(Guid128([3; 16]), 30)));
        // What we read back: everything as it was.
        assert_eq!(decode(&text).unwrap(), [ours_only, two_points, one_point]);
    }

    #[test]
    fn a_state_doveadm_printed_serves_both() {
        let theirs = state(4, 17, None);
        let text = wire::encode_state(&[convert::state_to_wire(&theirs)]);
        assert_eq!(decode(&text).unwrap(), [MailboxState { shared_modseq: Some(17), ..theirs }]);
    }
}

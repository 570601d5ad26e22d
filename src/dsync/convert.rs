//! Between the wire's records and the brain's meanings.
//!
//! The wire keeps values as byte strings that can travel unchanged; the brain works with names
//! and GUIDs as text. Names that are not UTF-8 are converted lossily (our Maildir can only
//! store UTF-8 names); GUID strings that are not UTF-8 cannot be stored by us either.

use super::brain::ibc::{Settings, SyncKind};
use super::brain::tree::{Delete, DeleteKind, Existence, NodeData};
use super::brain::types::{ChangeType, DsyncMailbox, KwOp, MailChange, MailHeader, MailRequest, MailboxState};
use super::wire;
use crate::store::Guid128;

fn text(t: &wire::Text) -> String {
    String::from_utf8_lossy(t.as_bytes()).into_owned()
}

fn wtext(s: &str) -> wire::Text {
    // Our strings come from the store or the peer and never contain NUL; if one did, it
    // would be cut as Dovecot's C strings cut it.
    let cut = s.split('\0').next().unwrap_or_default();
    wire::Text::new(cut.as_bytes().to_vec()).unwrap_or_default()
}

pub(crate) fn guid_from_wire(g: wire::Guid128) -> Guid128 {
    Guid128(g.to_bytes())
}

pub(crate) fn guid_to_wire(g: Guid128) -> wire::Guid128 {
    wire::Guid128::from_bytes(g.0)
}

/// The master's (or our) handshake as brain settings.
pub(crate) fn settings_from_wire(h: &wire::Handshake) -> Settings {
    Settings {
        hostname: text(&h.hostname),
        sync_ns_prefixes: h.sync_ns_prefixes.as_ref().map(|p| p.prefixes().iter().map(text).collect()),
        sync_box: h.sync_box.as_ref().map(text),
        sync_box_guid: h.sync_box_guid.map(guid_from_wire),
        sync_type: h.sync_type.map(|t| match t {
            wire::SyncType::Full => SyncKind::Full,
            wire::SyncType::Changed => SyncKind::Changed,
            wire::SyncType::State => SyncKind::State,
        }),
        debug: h.debug,
        sync_visible_namespaces: h.sync_visible_namespaces,
        exclude_mailboxes: h.exclude_mailboxes.as_ref().map(|v| v.iter().map(text).collect()).unwrap_or_default(),
        send_mail_requests: h.send_mail_requests,
        backup_send: h.backup_send,
        backup_recv: h.backup_recv,
        lock_timeout: h.lock_timeout.map_or(0, |n| n.get()),
        no_mail_sync: h.no_mail_sync,
        no_backup_overwrite: h.no_backup_overwrite,
        purge_remote: h.purge_remote,
        no_notify: h.no_notify,
        sync_since_timestamp: h.sync_since_timestamp.map_or(0, |n| n.get()),
        sync_max_size: h.sync_max_size.map_or(0, |n| n.get()),
        sync_flags: h.sync_flags.as_ref().map(text),
        sync_until_timestamp: h.sync_until_timestamp.map_or(0, |n| n.get()),
        virtual_all_box: h.virtual_all_box.as_ref().map(text),
        empty_hdr_workaround: h.empty_hdr_workaround,
        import_commit_msgs_interval: h.import_commit_msgs_interval.map_or(100, |n| n.get()),
        hashed_headers: h
            .hashed_headers
            .as_ref()
            .map(|v| v.iter().map(text).filter(|s| !s.is_empty()).collect())
            .unwrap_or_default(),
        alt_char: h.alt_char.map(|c| char::from(c.get())),
    }
}

/// Brain settings as a handshake record.
pub(crate) fn settings_to_wire(s: &Settings) -> wire::Handshake {
    use std::num::{NonZeroI64, NonZeroU8, NonZeroU32, NonZeroU64};
    wire::Handshake {
        hostname: wtext(&s.hostname),
        sync_ns_prefixes: s
            .sync_ns_prefixes
            .as_ref()
            .and_then(|p| wire::NsPrefixes::new(p.iter().map(|x| wtext(x)).collect()).ok()),
        sync_box: s.sync_box.as_deref().map(wtext),
        sync_box_guid: s.sync_box_guid.map(guid_to_wire),
        sync_type: s.sync_type.map(|t| match t {
            SyncKind::Full => wire::SyncType::Full,
            SyncKind::Changed => wire::SyncType::Changed,
            SyncKind::State => wire::SyncType::State,
        }),
        debug: s.debug,
        sync_visible_namespaces: s.sync_visible_namespaces,
        exclude_mailboxes: if s.exclude_mailboxes.is_empty() {
            None
        } else {
            Some(s.exclude_mailboxes.iter().map(|x| wtext(x)).collect())
        },
        send_mail_requests: s.send_mail_requests,
        backup_send: s.backup_send,
        backup_recv: s.backup_recv,
        lock_timeout: NonZeroU32::new(s.lock_timeout),
        no_mail_sync: s.no_mail_sync,
        no_backup_overwrite: s.no_backup_overwrite,
        purge_remote: s.purge_remote,
        no_notify: s.no_notify,
        sync_since_timestamp: NonZeroI64::new(s.sync_since_timestamp),
        sync_max_size: NonZeroU64::new(s.sync_max_size),
        sync_flags: s.sync_flags.as_deref().map(wtext),
        sync_until_timestamp: NonZeroI64::new(s.sync_until_timestamp),
        virtual_all_box: s.virtual_all_box.as_deref().map(wtext),
        empty_hdr_workaround: s.empty_hdr_workaround,
        import_commit_msgs_interval: None,
        hashed_headers: Some(s.hashed_headers.iter().map(|x| wtext(x)).collect()),
        alt_char: s.alt_char.and_then(|c| u8::try_from(c).ok()).and_then(NonZeroU8::new),
    }
}

pub(crate) fn state_from_wire(s: &wire::MailboxState) -> MailboxState {
    MailboxState {
        guid: guid_from_wire(s.mailbox_guid),
        last_uidvalidity: s.last_uidvalidity,
        last_common_uid: s.last_common_uid,
        last_common_modseq: s.last_common_modseq,
        last_common_pvt_modseq: s.last_common_pvt_modseq,
        last_messages_count: s.last_messages_count,
        changes_during_sync: s.changes_during_sync,
        shared_modseq: None,
    }
}

pub(crate) fn state_to_wire(s: &MailboxState) -> wire::MailboxState {
    wire::MailboxState {
        mailbox_guid: guid_to_wire(s.guid),
        last_uidvalidity: s.last_uidvalidity,
        last_common_uid: s.last_common_uid,
        last_common_modseq: s.last_common_modseq,
        last_common_pvt_modseq: s.last_common_pvt_modseq,
        last_messages_count: s.last_messages_count,
        changes_during_sync: s.changes_during_sync,
    }
}

pub(crate) fn node_from_wire(n: &wire::MailboxNode) -> (Vec<String>, NodeData) {
    let parts = n.name.components().iter().map(text).collect();
    let data = NodeData {
        guid: n.mailbox_guid.map(guid_from_wire).unwrap_or(Guid128::EMPTY),
        uid_validity: n.uid_validity,
        uid_next: n.uid_next,
        existence: match n.existence {
            wire::Existence::Nonexistent => Existence::Nonexistent,
            wire::Existence::Exists => Existence::Exists,
            wire::Existence::Deleted => Existence::Deleted,
        },
        last_renamed_or_created: n.last_renamed_or_created,
        subscribed: n.subscribed,
        last_subscription_change: n.last_subscription_change,
    };
    (parts, data)
}

pub(crate) fn node_to_wire(parts: &[String], d: &NodeData) -> Option<wire::MailboxNode> {
    let name = wire::MailboxPath::new(parts.iter().map(|p| wtext(p)).collect()).ok()?;
    Some(wire::MailboxNode {
        name,
        existence: match d.existence {
            Existence::Nonexistent => wire::Existence::Nonexistent,
            Existence::Exists => wire::Existence::Exists,
            Existence::Deleted => wire::Existence::Deleted,
        },
        mailbox_guid: (!d.guid.is_empty()).then(|| guid_to_wire(d.guid)),
        uid_validity: d.uid_validity,
        uid_next: d.uid_next,
        last_renamed_or_created: d.last_renamed_or_created,
        subscribed: d.subscribed,
        last_subscription_change: d.last_subscription_change,
    })
}

pub(crate) fn deletes_from_wire(d: &wire::MailboxDeletes) -> (char, Option<char>, Vec<Delete>) {
    let mut v = Vec::new();
    for (kind, list) in
        [(DeleteKind::Mailbox, &d.mailboxes), (DeleteKind::Dir, &d.dirs), (DeleteKind::Unsubscribe, &d.unsubscribes)]
    {
        for x in list {
            v.push(Delete { kind, guid: guid_from_wire(x.guid), time: x.timestamp });
        }
    }
    (char::from(d.hierarchy_sep.get()), d.escape_char.map(|c| char::from(c.get())), v)
}

pub(crate) fn deletes_to_wire(sep: char, escape: Option<char>, deletes: &[Delete]) -> Option<wire::MailboxDeletes> {
    let sep = wire::HierarchySep::new(u8::try_from(sep).ok()?)?;
    let pick = |k: DeleteKind| -> Vec<wire::Deletion> {
        deletes
            .iter()
            .filter(|d| d.kind == k)
            .map(|d| wire::Deletion { guid: guid_to_wire(d.guid), timestamp: d.time })
            .collect()
    };
    Some(wire::MailboxDeletes {
        hierarchy_sep: sep,
        escape_char: escape.and_then(|c| u8::try_from(c).ok()).and_then(std::num::NonZeroU8::new),
        mailboxes: pick(DeleteKind::Mailbox),
        dirs: pick(DeleteKind::Dir),
        unsubscribes: pick(DeleteKind::Unsubscribe),
    })
}

pub(crate) fn mailbox_from_wire(b: &wire::Mailbox) -> DsyncMailbox {
    DsyncMailbox {
        guid: guid_from_wire(b.mailbox_guid),
        uid_validity: b.uid_validity,
        uid_next: b.uid_next,
        messages_count: b.messages_count,
        first_recent_uid: b.first_recent_uid,
        highest_modseq: b.highest_modseq,
        highest_pvt_modseq: b.highest_pvt_modseq,
        mailbox_lost: b.mailbox_lost,
        mailbox_ignore: b.mailbox_ignore,
        cache_fields: Vec::new(),
        have_guids: b.have_guids,
        have_save_guids: b.have_save_guids,
        have_only_guid128: b.have_only_guid128,
    }
}

pub(crate) fn mailbox_to_wire(b: &DsyncMailbox) -> wire::Mailbox {
    wire::Mailbox {
        mailbox_guid: guid_to_wire(b.guid),
        uid_validity: b.uid_validity,
        uid_next: b.uid_next,
        messages_count: b.messages_count,
        first_recent_uid: b.first_recent_uid,
        highest_modseq: b.highest_modseq,
        highest_pvt_modseq: b.highest_pvt_modseq,
        mailbox_lost: b.mailbox_lost,
        mailbox_ignore: b.mailbox_ignore,
        cache_fields: Vec::new(),
        have_guids: b.have_guids,
        have_save_guids: b.have_save_guids,
        have_only_guid128: b.have_only_guid128,
    }
}

fn kwop_from_wire(op: wire::KeywordOp) -> KwOp {
    match op {
        wire::KeywordOp::Add => KwOp::Add,
        wire::KeywordOp::Remove => KwOp::Remove,
        wire::KeywordOp::Final => KwOp::Final,
        wire::KeywordOp::AddAndFinal => KwOp::AddAndFinal,
    }
}

fn kwop_to_wire(op: KwOp) -> wire::KeywordOp {
    match op {
        KwOp::Add => wire::KeywordOp::Add,
        KwOp::Remove => wire::KeywordOp::Remove,
        KwOp::Final => wire::KeywordOp::Final,
        KwOp::AddAndFinal => wire::KeywordOp::AddAndFinal,
    }
}

pub(crate) fn change_from_wire(c: &wire::MailChange) -> MailChange {
    MailChange {
        kind: match c.change_type {
            wire::ChangeType::Save => ChangeType::Save,
            wire::ChangeType::Expunge => ChangeType::Expunge,
            wire::ChangeType::FlagChange => ChangeType::FlagChange,
        },
        uid: c.uid,
        guid: c.guid.as_ref().map(text),
        hdr_hash: c.hdr_hash.as_ref().map(text),
        modseq: c.modseq,
        pvt_modseq: c.pvt_modseq,
        add_flags: c.add_flags.bits(),
        remove_flags: c.remove_flags.bits(),
        final_flags: c.final_flags.bits(),
        keywords_reset: c.keywords_reset,
        keyword_changes: c.keyword_changes.iter().map(|k| (kwop_from_wire(k.op), text(&k.keyword))).collect(),
        received_timestamp: i64::try_from(c.received_timestamp).unwrap_or(i64::MAX),
        virtual_size: (c.virtual_size != u64::MAX && c.virtual_size != 0).then_some(c.virtual_size),
    }
}

pub(crate) fn change_to_wire(c: &MailChange) -> wire::MailChange {
    wire::MailChange {
        change_type: match c.kind {
            ChangeType::Save => wire::ChangeType::Save,
            ChangeType::Expunge => wire::ChangeType::Expunge,
            ChangeType::FlagChange => wire::ChangeType::FlagChange,
        },
        uid: c.uid,
        guid: c.guid.as_deref().map(wtext),
        hdr_hash: c.hdr_hash.as_deref().map(wtext),
        modseq: c.modseq,
        pvt_modseq: c.pvt_modseq,
        add_flags: wire::WireFlags(c.add_flags),
        remove_flags: wire::WireFlags(c.remove_flags),
        final_flags: wire::WireFlags(c.final_flags),
        keywords_reset: c.keywords_reset,
        keyword_changes: c
            .keyword_changes
            .iter()
            .map(|(op, k)| wire::KeywordChange { op: kwop_to_wire(*op), keyword: wtext(k) })
            .collect(),
        received_timestamp: u64::try_from(c.received_timestamp).unwrap_or(0),
        // Saves carry "unknown" (all ones) as Dovecot sends them; others omit it.
        virtual_size: match (c.kind, c.virtual_size) {
            (_, Some(v)) => v,
            (ChangeType::Save, None) => u64::MAX,
            _ => 0,
        },
    }
}

pub(crate) fn request_from_wire(r: &wire::MailRequest) -> MailRequest {
    MailRequest { guid: r.guid.as_ref().map(text).filter(|g| !g.is_empty()), uid: r.uid }
}

pub(crate) fn request_to_wire(r: &MailRequest) -> wire::MailRequest {
    wire::MailRequest { guid: r.guid.as_deref().map(wtext), uid: r.uid }
}

pub(crate) fn mail_from_wire(m: &wire::Mail) -> MailHeader {
    MailHeader {
        guid: m.guid.as_ref().map(text).unwrap_or_default(),
        uid: m.uid,
        pop3_uidl: m.pop3_uidl.as_ref().map(text).unwrap_or_default(),
        pop3_order: m.pop3_order,
        received_date: m.received_date,
        saved_date: m.saved_date,
        has_body: m.stream,
    }
}

pub(crate) fn mail_to_wire(h: &MailHeader) -> wire::Mail {
    wire::Mail {
        guid: Some(wtext(&h.guid)),
        uid: h.uid,
        pop3_uidl: Some(wtext(&h.pop3_uidl)),
        pop3_order: h.pop3_order,
        received_date: h.received_date,
        saved_date: h.saved_date,
        stream: h.has_body,
    }
}

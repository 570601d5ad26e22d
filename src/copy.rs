//! A store-to-store copy through the [`MailStore`] trait: makes one store an exact copy of
//! another, with the same mailbox GUIDs, UIDVALIDITYs, UIDs, mail GUIDs, flags and keywords.
//!
//! This is what `mailreplica backup maildir:PATH` runs between two local stores. It stands in
//! until the dsync engine can drive both ends in one process (which will also speak to remote
//! peers); it is not incremental beyond skipping mails already present with the same UID and
//! GUID.

use crate::store::{
    FlagOp, MailStore, Mailbox, MailboxInfo, MailboxKind, MailboxName, MailboxStatus, MailboxUpdate, SaveRequest,
    SavedMail, StoreError, StoreResult, Uid,
};

/// Why a copy stopped. Whatever was copied before stays (every batch is committed).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CopyError {
    /// Reading the source or writing the destination failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The destination's INBOX has handed out UIDs the source has not reached, so it cannot be
    /// made a copy without reusing UIDs (INBOX cannot be deleted and recreated).
    #[error(
        "INBOX of the destination is ahead of the source (UIDNEXT {dst_uid_next} > {src_uid_next}); it can't be replaced in place"
    )]
    InboxAhead {
        /// The destination INBOX's UIDNEXT.
        dst_uid_next: u32,
        /// The source INBOX's UIDNEXT.
        src_uid_next: u32,
    },
    /// Another writer took a UID while the copy was saving into the destination.
    #[error("UID {requested} was taken by another writer while copying (got {got}); run the backup again")]
    UidTaken {
        /// The source's UID, asked for.
        requested: Uid,
        /// The UID the destination gave instead.
        got: Uid,
    },
}

/// What a copy did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CopyStats {
    /// Mails saved into the destination.
    pub saved: usize,
    /// Mails expunged from the destination.
    pub expunged: usize,
    /// Flag updates.
    pub flag_changes: usize,
    /// Mailboxes created or recreated.
    pub mailboxes_created: usize,
    /// Mailboxes deleted.
    pub mailboxes_deleted: usize,
}

/// Makes `dst` an exact copy of `src`.
pub fn copy_store<S: MailStore, D: MailStore>(src: &mut S, dst: &mut D) -> Result<CopyStats, CopyError> {
    let mut stats = CopyStats::default();
    let src_list = src.list()?;
    let dst_list = dst.list()?;
    let src_boxes: Vec<&MailboxInfo> = src_list.iter().filter(|i| i.kind == MailboxKind::Mailbox).collect();
    // Destination mailboxes that the source does not have, deepest first.
    let mut gone: Vec<&MailboxInfo> = dst_list
        .iter()
        .filter(|d| d.kind == MailboxKind::Mailbox && !d.name.is_inbox())
        .filter(|d| !src_boxes.iter().any(|s| s.name == d.name))
        .collect();
    gone.sort_by_key(|d| std::cmp::Reverse(d.name.components().len()));
    for d in gone {
        dst.delete_mailbox(&d.name)?;
        stats.mailboxes_deleted += 1;
    }
    for s in &src_boxes {
        let existing = dst_list.iter().find(|d| d.name == s.name && d.kind == MailboxKind::Mailbox);
        copy_mailbox(src, dst, s, existing, &mut stats)?;
    }
    // Subscriptions follow the source.
    for d in dst_list.iter().filter(|d| d.subscribed) {
        if !src_list.iter().any(|s| s.subscribed && s.name == d.name) {
            dst.set_subscribed(&d.name, false)?;
        }
    }
    for s in src_list.iter().filter(|s| s.subscribed) {
        if !dst_list.iter().any(|d| d.subscribed && d.name == s.name) {
            dst.set_subscribed(&s.name, true)?;
        }
    }
    Ok(stats)
}

fn copy_mailbox<S: MailStore, D: MailStore>(
    src: &mut S,
    dst: &mut D,
    info: &MailboxInfo,
    existing: Option<&MailboxInfo>,
    stats: &mut CopyStats,
) -> Result<(), CopyError> {
    let name: &MailboxName = &info.name;
    let mut sbox = src.open(name)?;
    let sstat = sbox.status();
    let smails = sbox.mails();
    let same_identity = existing.is_some_and(|e| e.guid == Some(sstat.guid) && e.uid_validity == sstat.uid_validity);
    let mut dbox = if same_identity {
        dst.open(name)?
    } else {
        if existing.is_some() && !name.is_inbox() {
            dst.delete_mailbox(name)?;
        }
        if existing.is_none() || !name.is_inbox() {
            create_or_adopt(dst, name, &sstat)?;
        }
        stats.mailboxes_created += 1;
        dst.open(name)?
    };
    let dstat = dbox.status();
    // Everything in the destination must be a prefix-compatible subset of the source:
    // same GUID at the same UID, and nothing at UIDs the source has not reached.
    let dmails = dbox.mails();
    let consistent = dstat.guid == sstat.guid
        && dstat.uid_validity == sstat.uid_validity
        && dstat.uid_next <= sstat.uid_next
        && dmails
            .iter()
            .all(|d| smails.binary_search_by_key(&d.uid, |s| s.uid).map(|i| smails[i].guid == d.guid).unwrap_or(true));
    if !consistent {
        // Cannot be fixed in place without reusing UIDs: start this mailbox over.
        drop(dbox);
        if name.is_inbox() {
            let mut b = dst.open(name)?;
            let uids: Vec<_> = b.mails().iter().map(|m| m.uid).collect();
            stats.expunged += uids.len();
            b.expunge(&uids)?;
            let st = b.status();
            if st.uid_next > sstat.uid_next {
                return Err(CopyError::InboxAhead { dst_uid_next: st.uid_next, src_uid_next: sstat.uid_next });
            }
            b.update(&MailboxUpdate {
                uid_validity: Some(sstat.uid_validity),
                guid: Some(sstat.guid),
                ..Default::default()
            })?;
            b.sync_point()?;
        } else {
            dst.delete_mailbox(name)?;
            create_or_adopt(dst, name, &sstat)?;
        }
        stats.mailboxes_created += 1;
        dbox = dst.open(name)?;
    }
    let dmails = dbox.mails();
    // Expunge what the source no longer has.
    let stale: Vec<_> =
        dmails.iter().filter(|d| smails.binary_search_by_key(&d.uid, |s| s.uid).is_err()).map(|d| d.uid).collect();
    stats.expunged += stale.len();
    dbox.expunge(&stale)?;
    let mut pending = 0;
    for s in &smails {
        match dmails.binary_search_by_key(&s.uid, |d| d.uid) {
            Ok(i) => {
                let d = &dmails[i];
                if d.flags != s.flags || d.keywords != s.keywords {
                    dbox.change_flags(s.uid, FlagOp::Replace, s.flags, &s.keywords, 0)?;
                    stats.flag_changes += 1;
                }
            }
            Err(_) => {
                let received = sbox.received_date(s.uid)?;
                let mut body = sbox.open_body(s.uid)?;
                let req = SaveRequest {
                    uid: Some(s.uid),
                    guid: Some(s.guid.clone()),
                    flags: s.flags,
                    keywords: s.keywords.clone(),
                    received: Some(received),
                    min_modseq: 0,
                };
                dbox.save(req, &mut body)?;
                pending += 1;
                if pending == 100 {
                    check_uids(dbox.commit()?)?;
                    stats.saved += pending;
                    pending = 0;
                }
            }
        }
    }
    check_uids(dbox.commit()?)?;
    stats.saved += pending;
    dbox.update(&MailboxUpdate { min_next_uid: Some(sstat.uid_next), ..Default::default() })?;
    dbox.sync_point()?;
    Ok(())
}

fn create_or_adopt<D: MailStore>(dst: &mut D, name: &MailboxName, st: &MailboxStatus) -> StoreResult<()> {
    dst.create_mailbox(name, Some(st.guid), Some(st.uid_validity))
}

fn check_uids(saved: Vec<SavedMail>) -> Result<(), CopyError> {
    for s in saved {
        if let Some(requested) = s.requested
            && requested != s.uid
        {
            return Err(CopyError::UidTaken { requested, got: s.uid });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::store::{Flags, Keyword, Uid};

    #[test]
    fn copies_between_memory_stores() {
        let mut a = MemoryStore::new();
        let mut b = MemoryStore::new();
        let arch = MailboxName::parse("Archive/2024", '/').unwrap();
        a.create_mailbox(&arch, None, Some(42)).unwrap();
        let mut mb = a.open(&MailboxName::inbox()).unwrap();
        for i in 0..5u8 {
            let req = SaveRequest { flags: if i % 2 == 0 { Flags::SEEN } else { Flags::NONE }, ..Default::default() };
            mb.save(req, &mut &[b'x', i, b'\n'][..]).unwrap();
        }
        mb.commit().unwrap();
        mb.expunge(&[Uid::new(2).unwrap()]).unwrap();
        mb.change_flags(Uid::new(3).unwrap(), FlagOp::Add, Flags::FLAGGED, &[Keyword::new("$Junk").unwrap()], 0)
            .unwrap();
        a.set_subscribed(&arch, true).unwrap();
        let st = copy_store(&mut a, &mut b).unwrap();
        assert_eq!(st.saved, 4);
        let mut bi = b.open(&MailboxName::inbox()).unwrap();
        assert_eq!(
            bi.mails(),
            mb.mails()
                .into_iter()
                .map(|mut m| {
                    m.modseq = bi.mail(m.uid).unwrap().modseq;
                    m
                })
                .collect::<Vec<_>>()
        );
        assert_eq!(bi.status().uid_validity, mb.status().uid_validity);
        assert_eq!(b.open(&arch).unwrap().status().uid_validity, 42);
        // A second run changes nothing.
        let st = copy_store(&mut a, &mut b).unwrap();
        assert_eq!(st, CopyStats::default());
        bi.refresh().unwrap();
    }
}

//! The mailbox-tree half of a session: building our tree from the store, exchanging trees
//! and deletion records with the peer, merging them (both sides run the same merge,
//! [`super::tree_sync`]) and applying our half of the result to the store
//! (`dsync-brain-mailbox-tree.c`, `dsync-brain-mailbox-tree-sync.c`).

use std::collections::HashMap;

use super::ibc::{Ibc, Incoming, Settings};
use super::session::{Brain, BrainError, ESCAPE_CHAR, State, unexpected};
use super::tree::{Delete, DeleteKind, Existence, NodeData, Tree};
use super::tree_sync::{SyncType, TreeChange, sync_trees};
use crate::store::{
    Guid128, ListChangeKind, MailStore, Mailbox, MailboxInfo, MailboxKind, MailboxName, MailboxUpdate, StoreError,
};

impl<S: MailStore, I: Ibc> Brain<'_, S, I> {
    pub(super) fn send_tree(&mut self) -> Result<bool, BrainError> {
        if self.tree_send.is_none() {
            self.local_tree = fill_local_tree(self.store, &self.settings, self.limits.max_mailboxes)?;
            self.tree_send = Some((self.local_tree.iter_dfs(), 0));
        }
        let Some((order, mut i)) = self.tree_send.take() else { return Ok(false) };
        while i < order.len() {
            if self.ibc.send_queue_full() {
                self.tree_send = Some((order, i));
                return Ok(true);
            }
            let id = order[i];
            let n = self.local_tree.node(id);
            let data = NodeData {
                guid: n.guid,
                uid_validity: n.uid_validity,
                uid_next: n.uid_next,
                existence: n.existence,
                last_renamed_or_created: n.last_renamed_or_created,
                subscribed: n.subscribed,
                last_subscription_change: n.last_subscription_change,
            };
            let parts = self.local_tree.parts(id);
            self.ibc.send_node(&parts, &data)?;
            i += 1;
        }
        self.ibc.send_end_of_list()?;
        let sep = self.local_tree.sep;
        let deletes = self.local_tree.deletes.clone();
        self.ibc.send_deletes(sep, Some(ESCAPE_CHAR), &deletes)?;
        self.tree_send = Some((Vec::new(), 0));
        self.state = State::RecvTree;
        Ok(true)
    }

    pub(super) fn recv_tree(&mut self) -> Result<bool, BrainError> {
        let sep = self.local_tree.sep;
        let mut progress = false;
        while let Some(inc) = self.ibc.try_recv()? {
            progress = true;
            match inc {
                Incoming::Node { parts, data } => {
                    self.check_name(&parts)?;
                    if self.remote_tree.nodes.len() >= self.limits.max_mailboxes.saturating_mul(2) {
                        return Err(BrainError::Limit(format!(
                            "more than {} mailboxes in the remote's tree",
                            self.limits.max_mailboxes
                        )));
                    }
                    let parts = fix_remote_parts(&parts, sep, self.alt_char);
                    let id = self.remote_tree.get(&parts);
                    self.remote_tree.node_mut(id).copy_data_from(&data);
                }
                Incoming::EndOfList => {
                    self.state = State::RecvDeletes;
                    break;
                }
                other => return Err(unexpected("a mailbox tree node or its list end", &other)),
            }
        }
        Ok(progress)
    }

    /// A name's depth and length are bounded before any tree work: every walk of the tree is
    /// then bounded too.
    fn check_name(&self, parts: &[String]) -> Result<(), BrainError> {
        if parts.is_empty() {
            return Err(BrainError::Protocol("mailbox tree node without a name".into()));
        }
        if parts.len() > self.limits.max_name_levels {
            return Err(BrainError::Limit(format!(
                "a mailbox name of {} hierarchy levels (the limit is {})",
                parts.len(),
                self.limits.max_name_levels
            )));
        }
        let bytes: usize = parts.iter().map(|p| p.len() + 1).sum();
        if bytes > self.limits.max_name_bytes {
            return Err(BrainError::Limit(format!(
                "a mailbox name of {bytes} bytes (the limit is {})",
                self.limits.max_name_bytes
            )));
        }
        Ok(())
    }

    pub(super) fn recv_deletes(&mut self) -> Result<bool, BrainError> {
        let Some(inc) = self.ibc.try_recv()? else { return Ok(false) };
        let (rsep, resc, rdeletes) = match inc {
            Incoming::Deletes { sep, escape, deletes } => (sep, escape, deletes),
            other => return Err(unexpected("the mailbox deletions", &other)),
        };
        if rdeletes.len() > self.limits.max_mailboxes {
            return Err(BrainError::Limit(format!("more than {} deletion records", self.limits.max_mailboxes)));
        }
        if let Err((a, b)) = self.remote_tree.build_guid_hash() {
            return Err(BrainError::Protocol(format!(
                "remote sent duplicate mailbox GUID {} for mailboxes {} and {}",
                self.remote_tree.node(a).guid,
                self.remote_tree.full_name(a),
                self.remote_tree.full_name(b)
            )));
        }
        // The remote's deletions, matched against our tree, marked in the remote tree.
        self.local_tree.set_remote_naming(rsep, resc);
        for d in &rdeletes {
            add_delete(&mut self.local_tree, &mut self.remote_tree, d);
        }
        // Our deletions, matched against the remote tree, marked in our tree.
        let ours = self.local_tree.deletes.clone();
        self.remote_tree.set_remote_naming(self.local_tree.sep, Some(ESCAPE_CHAR));
        for d in &ours {
            add_delete(&mut self.remote_tree, &mut self.local_tree, d);
        }
        self.apply_tree_changes()?;
        self.state = if self.master { State::MasterSendMailbox } else { State::SlaveRecvMailbox };
        Ok(true)
    }

    fn tree_sync_type(&self) -> SyncType {
        if self.settings.no_backup_overwrite {
            SyncType::TwoWay
        } else if self.settings.backup_send {
            SyncType::PreserveLocal
        } else if self.settings.backup_recv {
            SyncType::PreserveRemote
        } else {
            SyncType::TwoWay
        }
    }

    fn apply_tree_changes(&mut self) -> Result<(), BrainError> {
        let ty = self.tree_sync_type();
        let changes = sync_trees(&mut self.local_tree, &mut self.remote_tree, ty)
            .map_err(|e| BrainError::Failed(e.to_string()))?;
        if self.settings.backup_send {
            // The backup source never changes its mailboxes.
            return Ok(());
        }
        for change in changes {
            tracing::debug!(?change, "mailbox tree change");
            self.apply_tree_change(&change)?;
        }
        Ok(())
    }

    fn name(&self, parts: &[String]) -> Result<MailboxName, BrainError> {
        MailboxName::from_components(parts.iter().cloned())
            .map_err(|e| BrainError::Protocol(format!("unusable mailbox name: {e}")))
    }

    /// The name of our mailbox with this GUID (`mailbox_alloc_guid`), from one listing kept up
    /// to date with our own changes.
    pub(super) fn find_by_guid(&mut self, guid: Guid128) -> Result<Option<MailboxName>, BrainError> {
        if self.guid_names.is_none() {
            let map: HashMap<Guid128, MailboxName> = self
                .store
                .list()?
                .into_iter()
                .filter(|i| i.kind == MailboxKind::Mailbox)
                .filter_map(|i| Some((i.guid?, i.name)))
                .collect();
            self.guid_names = Some(map);
        }
        Ok(self.guid_names.as_ref().and_then(|m| m.get(&guid).cloned()))
    }

    /// Forgets the GUID listing after a change that may have moved mailboxes around.
    pub(super) fn forget_names(&mut self) {
        self.guid_names = None;
    }

    fn apply_tree_change(&mut self, change: &TreeChange) -> Result<(), BrainError> {
        let conflict = StoreError::is_conflict;
        match change {
            TreeChange::DeleteBox { name, guid } => match self.find_by_guid(*guid)? {
                None => {
                    self.set_changes_during_sync(format!("mailbox {} GUID {guid} deletion conflict", name.join("/")))
                }
                Some(found) if found.is_inbox() => {
                    // INBOX cannot be deleted; forgetting its identity and mails is the same for
                    // a replica, and the following create gives it the source's identity.
                    match self.store.clear_inbox() {
                        Ok(()) => self.forget_names(),
                        Err(e) if conflict(&e) => self.set_changes_during_sync(format!("emptying INBOX: {e}")),
                        Err(e) => return Err(e.into()),
                    }
                }
                Some(found) => match self.store.delete_mailbox(&found) {
                    Ok(()) => self.forget_names(),
                    Err(e) if conflict(&e) => self.set_changes_during_sync(format!("deleting {}: {e}", name.join("/"))),
                    Err(e) => return Err(e.into()),
                },
            },
            TreeChange::CreateBox { name, guid, uid_validity } => {
                let mb = self.name(name)?;
                match self.store.create_mailbox(&mb, Some(*guid), Some(*uid_validity)) {
                    Ok(()) => {}
                    Err(e) if conflict(&e) => {}
                    Err(e) => return Err(e.into()),
                }
                self.forget_names();
                // The name may already have held another mailbox (both sides created INBOX):
                // the larger GUID wins in a two-way sync; a backup destination takes the
                // source's GUID.
                let mut b = self.store.open(&mb)?;
                let st = b.status();
                let local = st.guid;
                let ord = guid.0.cmp(&local.0);
                let backup = self.settings.backup_recv || self.settings.backup_send;
                let mut update = MailboxUpdate::default();
                if ord != std::cmp::Ordering::Equal && !backup {
                    self.merged_by_name.insert(*guid);
                    self.merged_by_name.insert(local);
                    // Two mailboxes met by name, and their counters may be equal by chance
                    // (same UIDVALIDITY, as many mails): a master skips a mailbox whose
                    // counters equal the peer's, so ours are made to differ now. Stored, so
                    // that the next sync still compares both when this one loses the mailbox
                    // half-way (Dovecot 2.3's slave can, after a GUID change by name).
                    update.min_highest_modseq =
                        Some(super::box_sync::modseq_above(st.highest_modseq, || name.join("/"))?);
                }
                let change_ours = (ord == std::cmp::Ordering::Greater && !backup)
                    || (ord != std::cmp::Ordering::Equal && self.settings.backup_recv);
                if change_ours {
                    tracing::debug!(mailbox = %name.join("/"), from = %local, to = %guid, "changing mailbox GUID");
                    update.guid = Some(*guid);
                }
                if update != MailboxUpdate::default() {
                    b.update(&update)?;
                    b.sync_point()?;
                }
            }
            TreeChange::Rename { from, to, subscribed } => {
                let (f, t) = (self.name(from)?, self.name(to)?);
                match self.store.rename_mailbox(&f, &t) {
                    Ok(()) => {
                        self.forget_names();
                        // The subscription follows the mailbox (the merge moved it along in
                        // both trees); the store's rename leaves subscriptions alone.
                        if *subscribed {
                            self.store.set_subscribed(&t, true)?;
                            self.store.set_subscribed(&f, false)?;
                        }
                    }
                    Err(e) if conflict(&e) => {
                        self.set_changes_during_sync(format!("renaming {} to {}: {e}", from.join("/"), to.join("/")))
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            TreeChange::ForgetSubscription { name } => {
                // Unless the merged tree has that name subscribed again (another mailbox took
                // the name, or the peer's stale subscription met a live one of ours).
                let still = self.local_tree.lookup(name).is_some_and(|n| self.local_tree.node(n).subscribed);
                if !still && let Ok(mb) = self.name(name) {
                    self.store.forget_subscription(&mb)?;
                }
            }
            TreeChange::Subscribe { name } | TreeChange::Unsubscribe { name } => {
                let mb = self.name(name)?;
                let on = matches!(change, TreeChange::Subscribe { .. });
                self.store.set_subscribed(&mb, on)?;
            }
            TreeChange::CreateDir { name } | TreeChange::DeleteDir { name } => {
                // A Maildir has no directories apart from its mailboxes; nothing to do.
                tracing::debug!(mailbox = %name.join("/"), ?change, "directory change needs no action");
            }
        }
        Ok(())
    }
}

/// Builds our side's tree from the store and its mailbox-list change log
/// (`dsync_mailbox_tree_fill` and `dsync_mailbox_tree_add_change_timestamps`).
pub(crate) fn fill_local_tree<S: MailStore>(
    store: &mut S,
    settings: &Settings,
    max_mailboxes: usize,
) -> Result<Tree, BrainError> {
    let sep = store.hierarchy_separator();
    let mut tree = Tree::new(sep);
    let infos = store.list()?;
    if infos.len() > max_mailboxes {
        return Err(BrainError::Limit(format!(
            "this account has {} mailboxes, more than the limit of {max_mailboxes}",
            infos.len()
        )));
    }
    // A special-use name (`\\Trash`) selects mailboxes by a flag this store does not keep:
    // refused openly rather than syncing what was meant to be left out.
    if let Some(x) = settings.sync_box.iter().chain(&settings.exclude_mailboxes).find(|x| x.starts_with('\\')) {
        return Err(BrainError::Unsupported(format!(
            "mailboxes chosen by special use ({x}) are not supported here; name the mailbox instead"
        )));
    }
    let wanted = |i: &MailboxInfo| -> bool {
        let vname = i.name.join(sep);
        if let Some(b) = &settings.sync_box
            && !crate::userdb::wildcard_match(b, &vname)
        {
            return false;
        }
        !settings.exclude_mailboxes.iter().any(|x| crate::userdb::wildcard_match(x, &vname))
    };
    for i in &infos {
        if !wanted(i) {
            continue;
        }
        if let Some(g) = settings.sync_box_guid
            && i.guid != Some(g)
        {
            continue;
        }
        match i.kind {
            MailboxKind::Mailbox => {
                let id = tree.get(i.name.components());
                let n = tree.node_mut(id);
                n.existence = Existence::Exists;
                n.guid = i.guid.unwrap_or_default();
                n.uid_validity = i.uid_validity;
                n.uid_next = i.uid_next;
            }
            MailboxKind::Directory => {
                let id = tree.get(i.name.components());
                tree.node_mut(id).existence = Existence::Exists;
            }
            MailboxKind::Nonexistent => {}
        }
    }
    for i in infos.iter().filter(|i| i.subscribed && wanted(i)) {
        let id = tree.get(i.name.components());
        tree.node_mut(id).subscribed = true;
    }
    if let Err((a, b)) = tree.build_guid_hash() {
        return Err(BrainError::Failed(format!(
            "duplicate mailbox GUID {} for mailboxes {} and {}",
            tree.node(a).guid,
            tree.full_name(a),
            tree.full_name(b)
        )));
    }
    // Timestamps and deletions from the mailbox-list change log.
    let changes = store.list_changes()?;
    let by_hash: HashMap<Guid128, usize> =
        tree.iter_dfs().into_iter().map(|id| (Guid128::sha128(tree.full_name(id).as_bytes()), id)).collect();
    for c in changes {
        let node = by_hash.get(&c.guid).copied();
        match c.kind {
            ListChangeKind::DeleteMailbox => {
                if !tree.guid_hash.contains_key(&c.guid) {
                    tree.deletes.push(Delete { kind: DeleteKind::Mailbox, guid: c.guid, time: c.time });
                }
            }
            ListChangeKind::DeleteDir => {
                if node.is_some_and(|n| tree.node(n).existence == Existence::Exists) {
                    continue;
                }
                tree.deletes.push(Delete { kind: DeleteKind::Dir, guid: c.guid, time: c.time });
            }
            ListChangeKind::CreateDir | ListChangeKind::Rename => {
                if let Some(n) = node {
                    tree.node_mut(n).last_renamed_or_created = c.time;
                }
            }
            ListChangeKind::Subscribe => {
                if let Some(n) = node {
                    tree.node_mut(n).last_subscription_change = c.time;
                }
            }
            ListChangeKind::Unsubscribe => match node {
                Some(n) => tree.node_mut(n).last_subscription_change = c.time,
                None => tree.deletes.push(Delete { kind: DeleteKind::Unsubscribe, guid: c.guid, time: c.time }),
            },
        }
    }
    Ok(tree)
}

/// Turns the remote's name levels into names our store can hold (`dsync_get_mailbox_name` and
/// `dsync_fix_mailbox_name`): our separator and control characters become the alt char, and
/// reserved names get a `_` prefix.
pub(crate) fn fix_remote_parts(parts: &[String], sep: char, alt: char) -> Vec<String> {
    parts
        .iter()
        .map(|p| {
            let mut s: String =
                p.chars().map(|c| if c == sep || c == '/' || c.is_control() { alt } else { c }).collect();
            if s.is_empty() || s == "." || s == ".." || s.starts_with('.') {
                s.insert(0, '_');
            }
            s
        })
        .collect()
}

/// `dsync_brain_mailbox_tree_add_delete`: a deletion from the other side, found by name or GUID
/// in `tree` (where the mailbox still exists), becomes a deleted node in `other`.
fn add_delete(tree: &mut Tree, other: &mut Tree, del: &Delete) {
    let Some(node) = tree.find_delete(del) else { return };
    let n = tree.node(node);
    match del.kind {
        DeleteKind::Mailbox => {}
        DeleteKind::Dir => {
            if del.time <= n.last_renamed_or_created {
                return;
            }
        }
        DeleteKind::Unsubscribe => {
            if del.time <= n.last_subscription_change {
                return;
            }
        }
    }
    let parts = tree.parts(node);
    let guid = n.guid;
    let oid = other.get(&parts);
    let o = other.node(oid);
    if o.existence == Existence::Exists && (!o.guid.is_empty() || del.kind != DeleteKind::Mailbox) {
        return; // recreated on the other side
    }
    if del.kind == DeleteKind::Mailbox {
        other.node_mut(oid).guid = guid;
    }
    if del.kind != DeleteKind::Unsubscribe {
        other.node_mut(oid).existence = Existence::Deleted;
    } else {
        let o = other.node_mut(oid);
        o.last_subscription_change = del.time;
        o.subscribed = false;
    }
    let _ = other.guid_hash_add(oid);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_names_are_made_storable() {
        let fixed = fix_remote_parts(&["a.b".into(), "..".into(), "x/y".into(), "tab\tbed".into()], '.', '_');
        assert_eq!(fixed, vec!["a_b", "__", "x_y", "tab_bed"]);
        assert_eq!(fix_remote_parts(&["..".into()], '/', '_'), vec!["_.."]);
    }
}

//! Merging two mailbox trees: which mailboxes and directories to create, delete, rename and
//! (un)subscribe on our side so that both sides end up with the same tree.
//!
//! Both sides of a dsync session run this algorithm on the same two trees (each seeing itself
//! as "local") and must reach mirror-image results, or the master later asks for mailboxes the
//! slave does not have. So this follows Dovecot's `dsync-mailbox-tree-sync.c` step by step,
//! including its tie-breaks and its quirks (it is our own code, written from reading theirs):
//!
//! 1. sort siblings by name; mailboxes marked deleted are deleted on the other side too
//!    (two-way), or simply forgotten (backup);
//! 2. propagate rename/creation timestamps to children;
//! 3. renames: walk both trees in name order and, where a name holds different mailboxes,
//!    move the one with the older timestamp out of the way (to `name-temp-N`), repeatedly,
//!    then give temporary names their final form (`name-<guid>`);
//! 4. backup: delete local mailboxes the source does not have or that differ in identity;
//! 5. create the mailboxes one side lacks, with the other side's GUID and UIDVALIDITY;
//! 6. directories and subscriptions.

use super::tree::{Existence, NodeId, ROOT, Tree};
use crate::store::Guid128;

/// Which side's tree wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SyncType {
    /// Two-way merge.
    TwoWay,
    /// Make the remote tree look like ours (we are the backup source; we change nothing).
    PreserveLocal,
    /// Make our tree look like the remote's (we are the backup destination).
    PreserveRemote,
}

/// A change to apply to our own store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TreeChange {
    /// Create a mailbox with this GUID and UIDVALIDITY (if the name exists with another GUID,
    /// the applier decides whose GUID wins).
    CreateBox { name: Vec<String>, guid: Guid128, uid_validity: u32 },
    /// Create a directory.
    CreateDir { name: Vec<String> },
    /// Delete the mailbox with this GUID.
    DeleteBox { name: Vec<String>, guid: Guid128 },
    /// Delete a directory.
    DeleteDir { name: Vec<String> },
    /// Rename a mailbox and its children; a subscribed mailbox takes its subscription along.
    Rename { from: Vec<String>, to: Vec<String>, subscribed: bool },
    /// The merge renamed the other side's subscribed mailbox away from this name: record that
    /// the name is no longer subscribed, so that a peer which keeps the subscription under the
    /// old name (Dovecot's rename leaves subscriptions alone) drops it at the next sync.
    ForgetSubscription { name: Vec<String> },
    /// Subscribe.
    Subscribe { name: Vec<String> },
    /// Unsubscribe.
    Unsubscribe { name: Vec<String> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Local,
    Remote,
}

impl Side {
    fn other(self) -> Self {
        match self {
            Self::Local => Self::Remote,
            Self::Remote => Self::Local,
        }
    }
}

const TEMP_MAX_NAME_LEN: usize = 100;
const TEMP_SUFFIX_MAX_LEN: usize = "temp-".len() + 8;

struct Ctx<'a> {
    local: &'a mut Tree,
    remote: &'a mut Tree,
    sync_type: SyncType,
    combined: usize,
    changes: Vec<TreeChange>,
}

/// Why the merge could not finish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mailbox renaming did not converge")]
pub(crate) struct RenameLoop;

/// Merges `remote` into `local` (both are modified to the merged state) and returns the changes
/// our store needs.
pub(crate) fn sync_trees(
    local: &mut Tree,
    remote: &mut Tree,
    sync_type: SyncType,
) -> Result<Vec<TreeChange>, RenameLoop> {
    let mut ctx = Ctx { local, remote, sync_type, combined: 0, changes: Vec::new() };
    let mut rename_counter = 0usize;
    loop {
        let mut renames = false;
        ctx.combined = 0;
        let twoway = sync_type == SyncType::TwoWay;
        ctx.sort_and_delete_mailboxes(Side::Remote, twoway);
        ctx.sort_and_delete_mailboxes(Side::Local, twoway);
        update_child_timestamps(ctx.local, ROOT, 0);
        update_child_timestamps(ctx.remote, ROOT, 0);
        ctx.handle_renames(&mut renames)?;
        match sync_type {
            SyncType::PreserveLocal => ctx.delete_wrong_mailboxes(Side::Remote),
            SyncType::PreserveRemote => ctx.delete_wrong_mailboxes(Side::Local),
            SyncType::TwoWay => {}
        }
        if sync_type != SyncType::PreserveLocal {
            ctx.create_mailboxes(Side::Remote);
        }
        if sync_type != SyncType::PreserveRemote {
            ctx.create_mailboxes(Side::Local);
        }
        if renames && rename_counter <= ctx.combined * 3 {
            rename_counter += 1;
            continue;
        }
        break;
    }
    ctx.sync_child_dirs(ROOT, ROOT);
    Ok(ctx.changes)
}

/// A child was renamed or created no earlier than its parent (iterative, parents first).
fn update_child_timestamps(t: &mut Tree, id: NodeId, parent_ts: i64) {
    let mut stack = vec![(id, parent_ts)];
    while let Some((id, parent_ts)) = stack.pop() {
        if t.node(id).last_renamed_or_created < parent_ts {
            t.node_mut(id).last_renamed_or_created = parent_ts;
        }
        let ts = t.node(id).last_renamed_or_created;
        stack.extend(t.node(id).children.iter().map(|&c| (c, ts)));
    }
}

impl Ctx<'_> {
    fn t(&mut self, side: Side) -> &mut Tree {
        match side {
            Side::Local => self.local,
            Side::Remote => self.remote,
        }
    }

    fn tr(&self, side: Side) -> &Tree {
        match side {
            Side::Local => self.local,
            Side::Remote => self.remote,
        }
    }

    fn push(&mut self, mut change: TreeChange) {
        if self.sync_type == SyncType::PreserveLocal {
            // The backup source never changes its own tree.
            tracing::debug!(?change, "not applied: we are the backup source");
            return;
        }
        if self.sync_type != SyncType::TwoWay {
            // A backup copies the source's subscriptions as they are, stale names included:
            // renames leave them alone, as Dovecot's do.
            match &mut change {
                TreeChange::Rename { subscribed, .. } => *subscribed = false,
                TreeChange::ForgetSubscription { .. } => return,
                _ => {}
            }
        }
        self.changes.push(change);
    }

    fn set_node_deleted(&mut self, side: Side, id: NodeId) {
        let t = self.t(side);
        let g = t.node(id).guid;
        if t.guid_hash.get(&g) == Some(&id) {
            t.guid_hash.remove(&g);
        }
        let n = t.node_mut(id);
        n.existence = Existence::Deleted;
        n.guid = Guid128::EMPTY;
        n.uid_validity = 0;
    }

    fn delete_mailbox_node(&mut self, side: Side, id: NodeId, reason: &str) {
        if side == Side::Local && self.local.node(id).existence != Existence::Deleted {
            let name = self.local.parts(id);
            let guid = self.local.node(id).guid;
            tracing::debug!(mailbox = ?name, %guid, reason, "deleting mailbox");
            self.push(TreeChange::DeleteBox { name, guid });
        }
        self.set_node_deleted(side, id);
    }

    fn delete_mailbox(&mut self, side: Side, id: NodeId, reason: &str) {
        let g = self.tr(side).node(id).guid;
        if let Some(&other) = self.tr(side.other()).guid_hash.get(&g) {
            self.delete_mailbox_node(side.other(), other, reason);
        }
        self.delete_mailbox_node(side, id, reason);
    }

    fn sort_and_delete_mailboxes(&mut self, side: Side, twoway: bool) {
        // Breadth first, as Dovecot does, so that deletions are listed in the same order.
        let mut queue = std::collections::VecDeque::from(vec![ROOT]);
        let mut order = Vec::new();
        while let Some(p) = queue.pop_front() {
            for c in self.tr(side).node(p).children.clone() {
                order.push(c);
                queue.push_back(c);
            }
        }
        for id in order {
            let n = self.tr(side).node(id);
            if n.existence == Existence::Deleted && !n.is_dir() {
                if twoway {
                    self.delete_mailbox(side, id, "Mailbox has been deleted");
                } else {
                    self.set_node_deleted(side, id);
                }
            }
            self.combined += 1;
        }
        let t = self.t(side);
        for id in 0..t.nodes.len() {
            t.sort_children(id);
        }
    }

    fn is_namespace_root(&self, side: Side, id: Option<NodeId>) -> bool {
        match id {
            None => false,
            Some(ROOT) => true,
            Some(n) => {
                let t = self.tr(side);
                t.node(n).name == "INBOX" && t.node(n).parent == Some(ROOT)
            }
        }
    }

    fn handle_renames(&mut self, renames: &mut bool) -> Result<(), RenameLoop> {
        let max = self.combined * 3;
        let mut count = 0;
        loop {
            let changed = self.rename_mailboxes(ROOT, ROOT);
            if !changed {
                break;
            }
            count += 1;
            if count > max {
                tracing::error!("mailbox renaming got into a loop, giving up");
                return Err(RenameLoop);
            }
        }
        while self.rename_temp_mailboxes(Side::Local, ROOT, renames) {}
        while self.rename_temp_mailboxes(Side::Remote, ROOT, renames) {}
        Ok(())
    }

    fn rename_mailboxes(&mut self, local_parent: NodeId, remote_parent: NodeId) -> bool {
        let mut i = 0;
        let mut j = 0;
        loop {
            let lk = self.local.node(local_parent).children.get(i).copied();
            let rk = self.remote.node(remote_parent).children.get(j).copied();
            if lk.is_none() && rk.is_none() {
                return false;
            }
            let local_node = match (lk, rk) {
                (Some(l), Some(r)) if self.local.node(l).name <= self.remote.node(r).name => l,
                (Some(l), None) => l,
                (_, Some(r)) => {
                    let (name, temp) = (self.remote.node(r).name.clone(), self.remote.node(r).sync_temporary_name);
                    self.local.new_node_at(local_parent, i, &name, temp)
                }
                (None, None) => return false,
            };
            let remote_node = match rk {
                Some(r) if self.remote.node(r).name <= self.local.node(local_node).name => r,
                _ => {
                    let (name, temp) =
                        (self.local.node(local_node).name.clone(), self.local.node(local_node).sync_temporary_name);
                    self.remote.new_node_at(remote_parent, j, &name, temp)
                }
            };
            debug_assert_eq!(self.local.node(local_node).name, self.remote.node(remote_node).name);
            let l_dir = self.local.node(local_node).is_dir();
            let r_dir = self.remote.node(remote_node).is_dir();
            let mut changed = if l_dir && r_dir {
                self.rename_directory(local_node, remote_node)
            } else if self.local.node(local_node).guid == self.remote.node(remote_node).guid {
                false
            } else {
                self.rename_conflict(local_node, remote_node)
            };
            if !changed {
                changed = self.rename_mailboxes(local_node, remote_node);
            }
            if changed {
                return true;
            }
            i += 1;
            j += 1;
        }
    }

    /// The other tree's parent of the first mailbox under `dir` that the other tree has.
    fn find_branch(&self, side: Side, dir: NodeId) -> Option<NodeId> {
        let t = self.tr(side);
        let other = self.tr(side.other());
        for &c in &t.node(dir).children {
            if t.node(c).is_dir() {
                if let Some(o) = self.find_branch(side, c) {
                    return Some(o);
                }
            } else if let Some(&o) = other.guid_hash.get(&t.node(c).guid) {
                return other.node(o).parent;
            }
        }
        None
    }

    fn names_equal(&self, remote_n: NodeId, local_n: NodeId) -> bool {
        let (mut a, mut b) = (Some(remote_n), Some(local_n));
        while let (Some(x), Some(y)) = (a, b) {
            if self.remote.node(x).name != self.local.node(y).name {
                return false;
            }
            a = self.remote.node(x).parent;
            b = self.local.node(y).parent;
        }
        a.is_none() && b.is_none()
    }

    fn rename_directory(&mut self, local_node1: NodeId, remote_node2: NodeId) -> bool {
        let remote_node1 = self.find_branch(Side::Local, local_node1);
        let local_node2 = self.find_branch(Side::Remote, remote_node2);
        let (Some(remote_node1), Some(local_node2)) = (remote_node1, local_node2) else {
            return false;
        };
        if self.names_equal(remote_node1, local_node2) {
            return false;
        }
        self.rename_lower_ts(local_node1, Some(remote_node1), Some(local_node2), remote_node2)
    }

    fn rename_conflict(&mut self, local_node1: NodeId, remote_node2: NodeId) -> bool {
        let remote_node1 = self.remote.guid_hash.get(&self.local.node(local_node1).guid).copied();
        let local_node2 = self.local.guid_hash.get(&self.remote.node(remote_node2).guid).copied();
        let r1_exists = remote_node1.is_some_and(|n| self.remote.node(n).existence == Existence::Exists);
        let l2_exists = local_node2.is_some_and(|n| self.local.node(n).existence == Existence::Exists);
        if r1_exists || l2_exists {
            self.rename_lower_ts(local_node1, remote_node1, local_node2, remote_node2)
        } else if self.local.node(local_node1).is_dir() || self.remote.node(remote_node2).is_dir() {
            false
        } else {
            // Two different mailboxes with one name and neither known to the other side:
            // merged later (the larger GUID wins).
            self.local.node_mut(local_node1).sync_delayed_guid_change = true;
            self.remote.node_mut(remote_node2).sync_delayed_guid_change = true;
            false
        }
    }

    fn timestamp(&self, n1: Option<(Side, NodeId)>, n2: Option<(Side, NodeId)>) -> i64 {
        let mut ts = 0;
        if let Some((s, n)) = n1 {
            let node = self.tr(s).node(n);
            if !node.sync_temporary_name {
                ts = node.last_renamed_or_created + 1;
            }
        }
        if let Some((s, n)) = n2 {
            let node = self.tr(s).node(n);
            if !node.sync_temporary_name && ts <= node.last_renamed_or_created {
                ts = node.last_renamed_or_created + 1;
            }
        }
        ts
    }

    /// Compares two sibling chains (a node and its following siblings) by existence and GUID,
    /// recursing into children (`node_mailbox_guids_cmp`).
    fn guids_cmp(&self, l: Option<(NodeId, usize)>, r: Option<(NodeId, usize)>) -> std::cmp::Ordering {
        use std::cmp::Ordering;
        let lkids = |p: NodeId| self.local.node(p).children.clone();
        let rkids = |p: NodeId| self.remote.node(p).children.clone();
        let (lv, mut li) = match l {
            Some((p, i)) => (lkids(p), i),
            None => (Vec::new(), 0),
        };
        let (rv, mut ri) = match r {
            Some((p, i)) => (rkids(p), i),
            None => (Vec::new(), 0),
        };
        loop {
            match (lv.get(li).copied(), rv.get(ri).copied()) {
                (Some(a), Some(b)) => {
                    let (na, nb) = (self.local.node(a), self.remote.node(b));
                    let (ea, eb) = (na.existence == Existence::Exists, nb.existence == Existence::Exists);
                    if ea && !eb {
                        return Ordering::Less;
                    }
                    if eb && !ea {
                        return Ordering::Greater;
                    }
                    let c = na.guid.0.cmp(&nb.guid.0);
                    if c != Ordering::Equal {
                        return c;
                    }
                    let c = self.guids_cmp(Some((a, 0)), Some((b, 0)));
                    if c != Ordering::Equal {
                        return c;
                    }
                    li += 1;
                    ri += 1;
                }
                (None, None) => return Ordering::Equal,
                (Some(_), None) => return Ordering::Less,
                (None, Some(_)) => return Ordering::Greater,
            }
        }
    }

    fn names_cmp(&self, l: Option<(NodeId, usize)>, r: Option<(NodeId, usize)>) -> std::cmp::Ordering {
        use std::cmp::Ordering;
        let lv = l.map(|(p, _)| self.local.node(p).children.clone()).unwrap_or_default();
        let rv = r.map(|(p, _)| self.remote.node(p).children.clone()).unwrap_or_default();
        let (mut li, mut ri) = (l.map_or(0, |x| x.1), r.map_or(0, |x| x.1));
        loop {
            match (lv.get(li).copied(), rv.get(ri).copied()) {
                (Some(a), Some(b)) => {
                    let c = self.local.node(a).name.cmp(&self.remote.node(b).name);
                    if c != Ordering::Equal {
                        return c;
                    }
                    let c = self.names_cmp(Some((a, 0)), Some((b, 0)));
                    if c != Ordering::Equal {
                        return c;
                    }
                    li += 1;
                    ri += 1;
                }
                (None, None) => return Ordering::Equal,
                (Some(_), None) => return Ordering::Less,
                (None, Some(_)) => return Ordering::Greater,
            }
        }
    }

    /// Position of a node among its siblings, as a chain start for the comparisons.
    fn chain(&self, side: Side, id: NodeId) -> Option<(NodeId, usize)> {
        let t = self.tr(side);
        let p = t.node(id).parent?;
        let i = t.node(p).children.iter().position(|&c| c == id)?;
        Some((p, i))
    }

    fn trees_cmp_is_less(&self, local_node1: NodeId, remote_node2: NodeId) -> bool {
        let l = self.chain(Side::Local, local_node1);
        let r = self.chain(Side::Remote, remote_node2);
        let c = self.guids_cmp(l, r);
        let c = if c == std::cmp::Ordering::Equal { self.names_cmp(l, r) } else { c };
        c == std::cmp::Ordering::Less
    }

    fn rename_lower_ts(
        &mut self,
        local_node1: NodeId,
        remote_node1: Option<NodeId>,
        local_node2: Option<NodeId>,
        remote_node2: NodeId,
    ) -> bool {
        if self.is_namespace_root(Side::Remote, remote_node1)
            || self.is_namespace_root(Side::Remote, Some(remote_node2))
            || self.is_namespace_root(Side::Local, Some(local_node1))
            || self.is_namespace_root(Side::Local, local_node2)
        {
            self.local.node_mut(local_node1).sync_delayed_guid_change = true;
            self.remote.node_mut(remote_node2).sync_delayed_guid_change = true;
            return false;
        }
        let mut local_ts = self.timestamp(Some((Side::Local, local_node1)), local_node2.map(|n| (Side::Local, n)));
        let mut remote_ts = self.timestamp(remote_node1.map(|n| (Side::Remote, n)), Some((Side::Remote, remote_node2)));
        match self.sync_type {
            SyncType::PreserveLocal => local_ts = remote_ts + 1,
            SyncType::PreserveRemote => remote_ts = local_ts + 1,
            SyncType::TwoWay => {}
        }
        let local_wins =
            local_ts > remote_ts || (local_ts == remote_ts && self.trees_cmp_is_less(local_node1, remote_node2));
        if local_wins {
            if local_node2.is_none() {
                let r1 = remote_node1.unwrap_or(remote_node2);
                self.rename_node(Side::Remote, remote_node2, r1, local_node1);
                return true;
            } else if remote_node1 == Some(remote_node2) {
                // Nothing to do (Dovecot's infinite-loop guard).
            } else if let Some(r1) = remote_node1 {
                self.rename_node(Side::Remote, remote_node2, r1, local_node1);
                return true;
            } else if let Some(l2) = local_node2
                .filter(|&l2| self.local.has_parent(local_node1, l2) && self.sync_type != SyncType::PreserveLocal)
            {
                let p = self.local.node(l2).parent.unwrap_or(ROOT);
                self.rename_node_to_temp(Side::Local, local_node1, p);
                return true;
            } else if let Some(l2) = local_node2
                .filter(|&l2| self.local.has_parent(l2, local_node1) && self.sync_type != SyncType::PreserveLocal)
            {
                let p = self.local.node(local_node1).parent.unwrap_or(ROOT);
                self.rename_node_to_temp(Side::Local, l2, p);
                return true;
            } else if self.local.node(local_node1).existence == Existence::Exists {
                let p = self.remote.node(remote_node2).parent.unwrap_or(ROOT);
                self.rename_node_to_temp(Side::Remote, remote_node2, p);
                return true;
            }
        } else if remote_node1.is_none() {
            if let Some(l2) = local_node2 {
                self.rename_node(Side::Local, local_node1, l2, remote_node2);
                return true;
            }
        } else if local_node2 == Some(local_node1) {
            // Nothing to do.
        } else if let Some(l2) = local_node2 {
            self.rename_node(Side::Local, local_node1, l2, remote_node2);
            return true;
        } else if let Some(r1) = remote_node1
            .filter(|&r1| self.remote.has_parent(r1, remote_node2) && self.sync_type != SyncType::PreserveRemote)
        {
            let p = self.remote.node(remote_node2).parent.unwrap_or(ROOT);
            self.rename_node_to_temp(Side::Remote, r1, p);
            return true;
        } else if let Some(r1) = remote_node1
            .filter(|&r1| self.remote.has_parent(remote_node2, r1) && self.sync_type != SyncType::PreserveRemote)
        {
            let p = self.remote.node(r1).parent.unwrap_or(ROOT);
            self.rename_node_to_temp(Side::Remote, remote_node2, p);
            return true;
        } else if self.remote.node(remote_node2).existence == Existence::Exists {
            let p = self.local.node(local_node1).parent.unwrap_or(ROOT);
            self.rename_node_to_temp(Side::Local, local_node1, p);
            return true;
        }
        false
    }

    fn node_has_child(&self, side: Side, parent: NodeId, name: &str) -> bool {
        let t = self.tr(side);
        t.node(parent).children.iter().any(|&c| t.node(c).name == name)
    }

    fn rename_node_to_temp(&mut self, side: Side, id: NodeId, new_parent: NodeId) {
        let mut max_prefix = TEMP_MAX_NAME_LEN - TEMP_SUFFIX_MAX_LEN - 1;
        let node = self.tr(side).node(id);
        if node.sync_temporary_name
            && let Some(p) = node.name.rfind('-')
        {
            max_prefix = max_prefix.min(p);
        }
        let mut prefix = truncate_bytes(&node.name, max_prefix).to_owned();
        prefix.push('-');
        let parent = node.parent.unwrap_or(ROOT);
        let mut counter = 1u32;
        let new_name = loop {
            let candidate = format!("{prefix}temp-{counter:x}");
            counter += 1;
            if !self.node_has_child(side, parent, &candidate) {
                break candidate;
            }
        };
        let old = self.tr(side).parts(id);
        let subscribed = self.tr(side).node(id).subscribed;
        let t = self.t(side);
        {
            let n = t.node_mut(id);
            n.name = new_name;
            n.sync_temporary_name = true;
            n.last_renamed_or_created = 0;
        }
        t.move_sorted(id, new_parent);
        if side == Side::Local && self.local.is_existent(id) {
            let to = self.local.parts(id);
            self.push(TreeChange::Rename { from: old, to, subscribed });
        } else if side == Side::Remote && subscribed {
            self.push(TreeChange::ForgetSubscription { name: old });
        }
    }

    /// Gets (creating if needed) the node at the same name as `other_id` in the other tree,
    /// re-sorting newly created ancestors (`sorted_tree_get_by_node_name`).
    fn sorted_get_by_other(&mut self, side: Side, other_id: NodeId) -> NodeId {
        if other_id == ROOT {
            return ROOT;
        }
        let parts = self.tr(side.other()).parts(other_id);
        self.sorted_get(side, &parts)
    }

    fn sorted_get(&mut self, side: Side, parts: &[String]) -> NodeId {
        let t = self.t(side);
        let ret = t.get(parts);
        let mut node = ret;
        while let Some(p) = t.node(node).parent {
            if t.node(node).existence != Existence::Nonexistent {
                break;
            }
            t.detach(node);
            t.attach_sorted(node, p);
            node = p;
        }
        ret
    }

    fn rename_node(&mut self, side: Side, temp_node: NodeId, node: NodeId, other_node: NodeId) {
        let other = side.other();
        let other_parent = self.tr(other).node(other_node).parent.unwrap_or(ROOT);
        let parent = self.sorted_get_by_other(side, other_parent);
        if self.tr(side).has_parent(parent, node) {
            self.rename_node_to_temp(side, node, ROOT);
            return;
        }
        let tp = self.tr(side).node(temp_node).parent.unwrap_or(ROOT);
        self.rename_node_to_temp(side, temp_node, tp);
        let old = self.tr(side).parts(node);
        let subscribed = self.tr(side).node(node).subscribed;
        let (oname, otemp, ots) = {
            let o = self.tr(other).node(other_node);
            (o.name.clone(), o.sync_temporary_name, o.last_renamed_or_created)
        };
        let t = self.t(side);
        {
            let n = t.node_mut(node);
            n.name = oname;
            n.sync_temporary_name = otemp;
            n.last_renamed_or_created = ots;
        }
        t.move_sorted(node, parent);
        if side == Side::Local && self.local.is_existent(node) {
            let to = self.remote.parts(other_node);
            self.push(TreeChange::Rename { from: old, to, subscribed });
        } else if side == Side::Remote && subscribed {
            self.push(TreeChange::ForgetSubscription { name: old });
        }
    }

    fn rename_temp_mailboxes(&mut self, side: Side, parent: NodeId, renames: &mut bool) -> bool {
        let kids = self.tr(side).node(parent).children.clone();
        for id in kids {
            while self.rename_temp_mailboxes(side, id, renames) {}
            let n = self.tr(side).node(id);
            if !n.sync_temporary_name {
                continue;
            }
            if n.is_dir() && (n.children.is_empty() || !self.tr(side).has_existent_children(id, false)) {
                self.delete_node_dirs(side, id);
            } else {
                *renames = true;
                self.rename_temp_node(side, id);
                return true;
            }
        }
        false
    }

    fn delete_node_dirs(&mut self, side: Side, id: NodeId) {
        for c in self.tr(side).node(id).children.clone() {
            self.delete_node_dirs(side, c);
        }
        if side == Side::Local
            && self.sync_type != SyncType::PreserveLocal
            && self.local.node(id).existence != Existence::Nonexistent
        {
            let name = self.local.parts(id);
            self.push(TreeChange::DeleteDir { name });
        }
        let n = self.t(side).node_mut(id);
        n.existence = Existence::Nonexistent;
        n.sync_temporary_name = false;
    }

    fn generate_suffix(&self, side: Side, id: NodeId) -> String {
        let t = self.tr(side);
        if !t.node(id).is_dir() {
            return t.node(id).guid.to_string();
        }
        fn first_existing(t: &Tree, id: NodeId) -> Option<NodeId> {
            for &c in &t.node(id).children {
                if t.node(c).existence == Existence::Exists {
                    return Some(c);
                }
                if let Some(x) = first_existing(t, c) {
                    return Some(x);
                }
            }
            None
        }
        use md5::{Digest, Md5};
        let mut h = Md5::new();
        if let Some(c) = first_existing(t, id) {
            h.update(t.node(c).guid.0);
            h.update(t.node(c).name.as_bytes());
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    fn rename_temp_node(&mut self, side: Side, id: NodeId) {
        let suffix = self.generate_suffix(side, id);
        let name = self.tr(side).node(id).name.clone();
        let after_dash = name.rfind('-').map_or(0, |p| p + 1);
        let max_prefix = (TEMP_MAX_NAME_LEN - suffix.len() - 1).min(after_dash);
        let mut s: Vec<u8> = truncate_bytes(&name, max_prefix).as_bytes().to_vec();
        s.extend_from_slice(suffix.as_bytes());
        let parent = self.tr(side).node(id).parent.unwrap_or(ROOT);
        while self.node_has_child(side, parent, &String::from_utf8_lossy(&s)) {
            suffix_inc(&mut s);
        }
        let t = self.t(side);
        t.node_mut(id).name = String::from_utf8_lossy(&s).into_owned();
        t.move_sorted(id, parent);
        t.node_mut(id).sync_temporary_name = false;
    }

    fn wrong_mailbox(&self, side: Side, id: NodeId, wanted: NodeId) -> Option<String> {
        let n = self.tr(side).node(id);
        let w = self.tr(side.other()).node(wanted);
        if w.existence != Existence::Exists {
            return Some(
                if w.existence == Existence::Deleted { "Mailbox has been deleted" } else { "Mailbox doesn't exist" }
                    .into(),
            );
        }
        if n.uid_validity != w.uid_validity {
            return Some(format!("UIDVALIDITY changed ({} -> {})", w.uid_validity, n.uid_validity));
        }
        if n.uid_next > w.uid_next {
            return Some(format!("UIDNEXT is too high ({} > {})", n.uid_next, w.uid_next));
        }
        if n.guid != w.guid {
            return Some("GUID changed".into());
        }
        None
    }

    fn delete_wrong_mailboxes(&mut self, side: Side) {
        self.delete_wrong_branch(side, Some(ROOT), Some(ROOT));
    }

    /// `sync_delete_wrong_mailboxes_branch`: walks `side`'s children of `parent` against the
    /// wanted tree's children of `wanted_parent` (both sorted), deleting what should not exist.
    fn delete_wrong_branch(&mut self, side: Side, parent: Option<NodeId>, wanted_parent: Option<NodeId>) {
        let Some(parent) = parent else { return };
        let kids = self.tr(side).node(parent).children.clone();
        let wkids = wanted_parent.map(|w| self.tr(side.other()).node(w).children.clone()).unwrap_or_default();
        let (mut i, mut j) = (0, 0);
        while i < kids.len() && j < wkids.len() {
            let (node, wanted) = (kids[i], wkids[j]);
            if !self.tr(side).node(node).children.is_empty() {
                self.delete_wrong_branch(side, Some(node), Some(wanted));
            }
            let c = self.tr(side).node(node).name.cmp(&self.tr(side.other()).node(wanted).name);
            let deletable = |s: &Self| {
                let n = s.tr(side).node(node);
                n.existence == Existence::Exists && !n.is_dir()
            };
            match c {
                std::cmp::Ordering::Less => {
                    if deletable(self) {
                        self.delete_mailbox_node(side, node, "Mailbox doesn't exist");
                    }
                    i += 1;
                }
                std::cmp::Ordering::Greater => j += 1,
                std::cmp::Ordering::Equal => {
                    if let Some(reason) = self.wrong_mailbox(side, node, wanted)
                        && deletable(self)
                    {
                        self.delete_mailbox_node(side, node, &reason);
                    }
                    i += 1;
                    j += 1;
                }
            }
        }
        for &node in &kids[i..] {
            if !self.tr(side).node(node).children.is_empty() {
                self.delete_wrong_branch(side, Some(node), None);
            }
            let n = self.tr(side).node(node);
            if n.existence == Existence::Exists && !n.is_dir() {
                self.delete_mailbox_node(side, node, "Mailbox doesn't exist");
            }
        }
    }

    /// For every mailbox of `side`, make sure the other side has it (`sync_create_mailboxes`).
    fn create_mailboxes(&mut self, side: Side) {
        let other = side.other();
        for id in self.tr(side).iter_dfs() {
            let n = self.tr(side).node(id).clone();
            if n.is_dir() {
                continue;
            }
            let parts = self.tr(side).parts(id);
            let other_id = match self.tr(other).guid_hash.get(&n.guid) {
                Some(&o) => o,
                None => self.sorted_get(other, &parts),
            };
            let o = self.tr(other).node(other_id);
            if o.is_dir() {
                {
                    let o = self.t(other).node_mut(other_id);
                    o.existence = Existence::Exists;
                    o.uid_validity = n.uid_validity;
                    o.guid = n.guid;
                }
                if other == Side::Local {
                    self.push(TreeChange::CreateBox { name: parts, guid: n.guid, uid_validity: n.uid_validity });
                }
            } else if n.guid != o.guid {
                // Same name, different GUIDs, neither known to the other side (typically both
                // created INBOX): one side adopts the other's GUID when the change is applied.
                if other == Side::Local {
                    self.push(TreeChange::CreateBox { name: parts, guid: n.guid, uid_validity: n.uid_validity });
                }
            }
        }
    }

    fn subscription(&mut self, l: NodeId, r: NodeId) {
        let (ln, rn) = (self.local.node(l), self.remote.node(r));
        let use_local = match self.sync_type {
            SyncType::PreserveLocal => true,
            SyncType::PreserveRemote => false,
            SyncType::TwoWay => match ln.last_subscription_change.cmp(&rn.last_subscription_change) {
                std::cmp::Ordering::Greater => true,
                std::cmp::Ordering::Less => false,
                std::cmp::Ordering::Equal => ln.subscribed,
            },
        };
        if use_local {
            let s = ln.subscribed;
            self.remote.node_mut(r).subscribed = s;
        } else {
            let s = rn.subscribed;
            self.local.node_mut(l).subscribed = s;
            let name = self.local.parts(l);
            self.push(if s { TreeChange::Subscribe { name } } else { TreeChange::Unsubscribe { name } });
        }
    }

    fn sync_child_dirs(&mut self, local_parent: NodeId, remote_parent: NodeId) {
        let (mut i, mut j) = (0, 0);
        loop {
            let lk = self.local.node(local_parent).children.get(i).copied();
            let rk = self.remote.node(remote_parent).children.get(j).copied();
            let (Some(l), Some(r)) = (lk, rk) else { break };
            match self.local.node(l).name.cmp(&self.remote.node(r).name) {
                std::cmp::Ordering::Less => {
                    if self.local.is_existent(l) {
                        tracing::debug!(name = %self.local.full_name(l), "tree merge left an unmatched local node");
                    }
                    self.local.node_mut(local_parent).children.remove(i);
                    continue;
                }
                std::cmp::Ordering::Greater => {
                    if self.remote.is_existent(r) {
                        tracing::debug!(name = %self.remote.full_name(r), "tree merge left an unmatched remote node");
                    }
                    self.remote.node_mut(remote_parent).children.remove(j);
                    continue;
                }
                std::cmp::Ordering::Equal => {}
            }
            let (le, re) = (self.local.node(l).existence, self.remote.node(r).existence);
            if le == Existence::Exists && re == Existence::Nonexistent && self.sync_type != SyncType::PreserveRemote {
                self.remote.node_mut(r).existence = Existence::Exists;
            }
            let re = self.remote.node(r).existence;
            if re == Existence::Exists && le == Existence::Nonexistent && self.sync_type != SyncType::PreserveLocal {
                self.local.node_mut(l).existence = Existence::Exists;
                let name = self.local.parts(l);
                self.push(TreeChange::CreateDir { name });
            }
            self.sync_child_dirs(l, r);
            if self.local.node(l).subscribed != self.remote.node(r).subscribed {
                self.subscription(l, r);
            }
            if self.local.node(l).existence == Existence::Deleted
                && !self.local.has_existent_children(l, true)
                && self.remote.node(r).existence == Existence::Exists
                && self.sync_type != SyncType::PreserveRemote
            {
                self.remote.node_mut(r).existence = Existence::Nonexistent;
            }
            if self.remote.node(r).existence == Existence::Deleted
                && !self.remote.has_existent_children(r, true)
                && self.local.node(l).existence == Existence::Exists
                && self.sync_type != SyncType::PreserveLocal
            {
                self.local.node_mut(l).existence = Existence::Nonexistent;
                let name = self.local.parts(l);
                self.push(TreeChange::DeleteDir { name });
            }
            i += 1;
            j += 1;
        }
        self.local.node_mut(local_parent).children.truncate(i);
        self.remote.node_mut(remote_parent).children.truncate(j);
    }
}

fn truncate_bytes(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Dovecot's `suffix_inc`: bump the last hex digit, carrying over `f`s (which stay `f`).
fn suffix_inc(s: &mut [u8]) {
    for c in s.iter_mut().rev() {
        match *c {
            b'0'..=b'8' | b'a'..=b'e' => {
                *c += 1;
                return;
            }
            b'9' => {
                *c = b'a';
                return;
            }
            b'f' => continue,
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dsync::brain::tree::Existence;

    fn mailbox(t: &mut Tree, name: &str, guid: u8, uv: u32) -> NodeId {
        let id = t.get_name(name);
        let n = t.node_mut(id);
        n.existence = Existence::Exists;
        n.guid = Guid128([guid; 16]);
        n.uid_validity = uv;
        n.uid_next = 1;
        id
    }

    fn run(local: &mut Tree, remote: &mut Tree, ty: SyncType) -> Vec<TreeChange> {
        local.build_guid_hash().unwrap();
        remote.build_guid_hash().unwrap();
        sync_trees(local, remote, ty).unwrap()
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn backup_into_empty_creates_everything() {
        let mut local = Tree::new('.');
        let mut remote = Tree::new('.');
        mailbox(&mut remote, "INBOX", 1, 10);
        mailbox(&mut remote, "Archive.2024", 2, 11);
        let ch = run(&mut local, &mut remote, SyncType::PreserveRemote);
        assert!(ch.contains(&TreeChange::CreateBox {
            name: names(&["INBOX"]),
            guid: Guid128([1; 16]),
            uid_validity: 10
        }));
        assert!(ch.contains(&TreeChange::CreateBox {
            name: names(&["Archive", "2024"]),
            guid: Guid128([2; 16]),
            uid_validity: 11
        }));
    }

    #[test]
    fn backup_deletes_extra_and_wrong_mailboxes() {
        let mut local = Tree::new('.');
        let mut remote = Tree::new('.');
        mailbox(&mut local, "INBOX", 1, 10);
        mailbox(&mut local, "Extra", 3, 12);
        mailbox(&mut local, "Wrong", 4, 99);
        mailbox(&mut remote, "INBOX", 1, 10);
        mailbox(&mut remote, "Wrong", 4, 13);
        let ch = run(&mut local, &mut remote, SyncType::PreserveRemote);
        assert!(ch.contains(&TreeChange::DeleteBox { name: names(&["Extra"]), guid: Guid128([3; 16]) }));
        assert!(ch.contains(&TreeChange::DeleteBox { name: names(&["Wrong"]), guid: Guid128([4; 16]) }));
        assert!(ch.contains(&TreeChange::CreateBox {
            name: names(&["Wrong"]),
            guid: Guid128([4; 16]),
            uid_validity: 13
        }));
    }

    #[test]
    fn source_side_changes_nothing() {
        let mut local = Tree::new('.');
        let mut remote = Tree::new('.');
        mailbox(&mut local, "INBOX", 1, 10);
        mailbox(&mut remote, "Other", 5, 10);
        assert!(run(&mut local, &mut remote, SyncType::PreserveLocal).is_empty());
    }

    #[test]
    fn backup_follows_a_rename() {
        let mut local = Tree::new('.');
        let mut remote = Tree::new('.');
        mailbox(&mut local, "Old", 7, 10);
        mailbox(&mut remote, "New", 7, 10);
        let ch = run(&mut local, &mut remote, SyncType::PreserveRemote);
        assert_eq!(ch, vec![TreeChange::Rename { from: names(&["Old"]), to: names(&["New"]), subscribed: false }]);
    }

    #[test]
    fn twoway_newer_rename_wins_and_deletes_propagate() {
        let mut local = Tree::new('.');
        let mut remote = Tree::new('.');
        let l = mailbox(&mut local, "A", 7, 10);
        local.node_mut(l).last_renamed_or_created = 100;
        let r = mailbox(&mut remote, "B", 7, 10);
        remote.node_mut(r).last_renamed_or_created = 200;
        let ch = run(&mut local, &mut remote, SyncType::TwoWay);
        assert_eq!(ch, vec![TreeChange::Rename { from: names(&["A"]), to: names(&["B"]), subscribed: false }]);

        let mut local = Tree::new('.');
        let mut remote = Tree::new('.');
        mailbox(&mut local, "Gone", 8, 10);
        let d = remote.get_name("Gone");
        remote.node_mut(d).existence = Existence::Deleted;
        remote.node_mut(d).guid = Guid128([8; 16]);
        let ch = run(&mut local, &mut remote, SyncType::TwoWay);
        assert_eq!(ch, vec![TreeChange::DeleteBox { name: names(&["Gone"]), guid: Guid128([8; 16]) }]);
    }

    #[test]
    fn subscriptions_follow_newer_change() {
        let mut local = Tree::new('.');
        let mut remote = Tree::new('.');
        mailbox(&mut local, "A", 7, 10);
        let r = mailbox(&mut remote, "A", 7, 10);
        remote.node_mut(r).subscribed = true;
        remote.node_mut(r).last_subscription_change = 5;
        let ch = run(&mut local, &mut remote, SyncType::TwoWay);
        assert_eq!(ch, vec![TreeChange::Subscribe { name: names(&["A"]) }]);
    }

    #[test]
    fn suffix_increment_like_dovecot() {
        let mut s = b"x-af".to_vec();
        suffix_inc(&mut s);
        assert_eq!(s, b"x-bf");
        let mut s = b"x-19".to_vec();
        suffix_inc(&mut s);
        assert_eq!(s, b"x-1a");
    }
}

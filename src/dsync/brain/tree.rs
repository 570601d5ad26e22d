//! The mailbox tree as dsync sees it: one node per hierarchy level, with the mailbox GUID,
//! UIDVALIDITY, existence, subscription state and change timestamps, plus the list of deletions
//! the side knows about.
//!
//! Both sides build the same structure (ours from the store, the peer's from its `N` and `D`
//! records) and then run the same deterministic merge ([`super::tree_sync`]); the result decides
//! which mailboxes are created, deleted or renamed. Node names are single hierarchy levels, never
//! containing a separator; children are ordered lists, kept sorted by name (byte order) where
//! the merge needs it.

use std::collections::HashMap;

use crate::store::{Guid128, UnixTime};

/// Index of a node in its tree.
pub(crate) type NodeId = usize;

/// The root node's index.
pub(crate) const ROOT: NodeId = 0;

/// Existence of a node (dsync's `enum dsync_mailbox_node_existence`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Existence {
    /// A filler parent, or a subscription-only name.
    Nonexistent,
    /// The mailbox exists (GUID set) or the directory exists (no GUID).
    Exists,
    /// The mailbox (GUID set) or directory was deleted.
    Deleted,
}

/// One tree node.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub(crate) name: String,
    pub(crate) parent: Option<NodeId>,
    pub(crate) children: Vec<NodeId>,
    /// Mailbox GUID; empty for directories.
    pub(crate) guid: Guid128,
    pub(crate) uid_validity: u32,
    pub(crate) uid_next: u32,
    pub(crate) existence: Existence,
    pub(crate) last_renamed_or_created: UnixTime,
    pub(crate) last_subscription_change: UnixTime,
    pub(crate) subscribed: bool,
    pub(crate) sync_delayed_guid_change: bool,
    pub(crate) sync_temporary_name: bool,
}

impl Node {
    fn new(name: &str, parent: Option<NodeId>) -> Self {
        Self {
            name: name.to_owned(),
            parent,
            children: Vec::new(),
            guid: Guid128::EMPTY,
            uid_validity: 0,
            uid_next: 0,
            existence: Existence::Nonexistent,
            last_renamed_or_created: 0,
            last_subscription_change: 0,
            subscribed: false,
            sync_delayed_guid_change: false,
            sync_temporary_name: false,
        }
    }

    /// A directory (or nonexistent name): no mailbox GUID.
    pub(crate) fn is_dir(&self) -> bool {
        self.guid.is_empty()
    }

    /// Copies everything but the name and the links (`dsync_mailbox_node_copy_data`).
    pub(crate) fn copy_data_from(&mut self, src: &NodeData) {
        self.guid = src.guid;
        self.uid_validity = src.uid_validity;
        self.uid_next = src.uid_next;
        self.existence = src.existence;
        self.last_renamed_or_created = src.last_renamed_or_created;
        self.subscribed = src.subscribed;
        self.last_subscription_change = src.last_subscription_change;
    }
}

/// The data of a node without its name and links: what an `N` record carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeData {
    pub(crate) guid: Guid128,
    pub(crate) uid_validity: u32,
    pub(crate) uid_next: u32,
    pub(crate) existence: Existence,
    pub(crate) last_renamed_or_created: UnixTime,
    pub(crate) subscribed: bool,
    pub(crate) last_subscription_change: UnixTime,
}

/// What a deletion record deletes (`enum dsync_mailbox_delete_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeleteKind {
    /// A mailbox, by GUID.
    Mailbox,
    /// A directory, by SHA-1/128 of its name.
    Dir,
    /// An unsubscription, by SHA-1/128 of the name.
    Unsubscribe,
}

/// A deletion a side knows about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Delete {
    pub(crate) kind: DeleteKind,
    pub(crate) guid: Guid128,
    pub(crate) time: UnixTime,
}

/// A dsync mailbox tree.
#[derive(Debug, Clone)]
pub(crate) struct Tree {
    pub(crate) nodes: Vec<Node>,
    pub(crate) sep: char,
    pub(crate) guid_hash: HashMap<Guid128, NodeId>,
    pub(crate) deletes: Vec<Delete>,
    /// The other side's separator and escape character, for matching its deletion records.
    pub(crate) remote_sep: Option<char>,
    pub(crate) remote_escape: Option<char>,
    /// SHA-1/128 of every node's name as the other side writes it, built on first use so that
    /// matching many deletion records costs one pass over the tree, not one per record.
    name_hashes: Option<HashMap<Guid128, NodeId>>,
}

impl Tree {
    /// An empty tree using `sep` to join names.
    pub(crate) fn new(sep: char) -> Self {
        Self {
            nodes: vec![Node::new("", None)],
            sep,
            guid_hash: HashMap::new(),
            deletes: Vec::new(),
            remote_sep: None,
            remote_escape: None,
            name_hashes: None,
        }
    }

    /// Sets how the other side writes names (for matching its deletion records by name).
    pub(crate) fn set_remote_naming(&mut self, sep: char, escape: Option<char>) {
        self.remote_sep = Some(sep);
        self.remote_escape = escape;
        self.name_hashes = None;
    }

    pub(crate) fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id]
    }

    pub(crate) fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id]
    }

    fn find_child(&self, parent: NodeId, name: &str) -> Option<NodeId> {
        self.nodes[parent].children.iter().copied().find(|&c| self.nodes[c].name == name)
    }

    /// Looks a node up by its hierarchy levels.
    pub(crate) fn lookup(&self, parts: &[String]) -> Option<NodeId> {
        let mut node = ROOT;
        for p in parts {
            node = self.find_child(node, p)?;
        }
        Some(node)
    }

    /// Looks a node up by its full name joined with the tree's separator.
    #[cfg(test)]
    pub(crate) fn lookup_name(&self, full: &str) -> Option<NodeId> {
        let parts: Vec<String> = full.split(self.sep).map(str::to_owned).collect();
        self.lookup(&parts)
    }

    /// Looks a node up, creating missing levels as nonexistent nodes (new nodes are put first
    /// among their siblings, as Dovecot does).
    pub(crate) fn get(&mut self, parts: &[String]) -> NodeId {
        let mut node = ROOT;
        for p in parts {
            node = match self.find_child(node, p) {
                Some(c) => c,
                None => {
                    let id = self.nodes.len();
                    self.nodes.push(Node::new(p, Some(node)));
                    self.nodes[node].children.insert(0, id);
                    self.name_hashes = None;
                    id
                }
            };
        }
        node
    }

    /// [`Tree::get`] with a joined name.
    #[cfg(test)]
    pub(crate) fn get_name(&mut self, full: &str) -> NodeId {
        let parts: Vec<String> = full.split(self.sep).map(str::to_owned).collect();
        self.get(&parts)
    }

    /// The hierarchy levels of a node (empty for the root).
    pub(crate) fn parts(&self, id: NodeId) -> Vec<String> {
        let mut v = Vec::new();
        let mut cur = Some(id);
        while let Some(c) = cur {
            if c == ROOT {
                break;
            }
            v.push(self.nodes[c].name.clone());
            cur = self.nodes[c].parent;
        }
        v.reverse();
        v
    }

    /// The full name joined with the tree's separator.
    pub(crate) fn full_name(&self, id: NodeId) -> String {
        let sep = self.sep.to_string();
        self.parts(id).join(&sep)
    }

    /// Depth-first order, parents before children, siblings in list order
    /// (`dsync_mailbox_tree_iter_next`). The root is not included.
    pub(crate) fn iter_dfs(&self) -> Vec<NodeId> {
        let mut out = Vec::with_capacity(self.nodes.len());
        let mut stack: Vec<NodeId> = self.nodes[ROOT].children.iter().rev().copied().collect();
        while let Some(n) = stack.pop() {
            out.push(n);
            stack.extend(self.nodes[n].children.iter().rev().copied());
        }
        out
    }

    /// Builds the GUID → node index. Returns the first pair of nodes sharing a GUID, if any.
    pub(crate) fn build_guid_hash(&mut self) -> Result<(), (NodeId, NodeId)> {
        self.guid_hash.clear();
        let mut dup = None;
        for id in self.iter_dfs() {
            let g = self.nodes[id].guid;
            if g.is_empty() {
                continue;
            }
            match self.guid_hash.get(&g) {
                Some(&old) if old != id => {
                    if dup.is_none() {
                        dup = Some((id, old));
                    }
                }
                Some(_) => {}
                None => {
                    self.guid_hash.insert(g, id);
                }
            }
        }
        match dup {
            Some(d) => Err(d),
            None => Ok(()),
        }
    }

    /// Adds one node to the GUID index; false if another node already has its GUID.
    pub(crate) fn guid_hash_add(&mut self, id: NodeId) -> bool {
        let g = self.nodes[id].guid;
        if g.is_empty() {
            return true;
        }
        match self.guid_hash.get(&g) {
            Some(&old) => old == id,
            None => {
                self.guid_hash.insert(g, id);
                true
            }
        }
    }

    /// SHA-1/128 of a node's name as the other side would write it (its separator and
    /// escape character), which is how directory and unsubscription deletes name it.
    fn remote_name_hash(&self, id: NodeId) -> Guid128 {
        let parts = self.parts(id);
        let name = match self.remote_sep {
            Some(rsep) if rsep != self.sep => {
                let mut s = String::new();
                for (i, p) in parts.iter().enumerate() {
                    if i > 0 {
                        s.push(rsep);
                    }
                    match self.remote_escape {
                        Some(esc) => {
                            for c in p.chars() {
                                if c == esc || c == rsep {
                                    s.push_str(&format!("{esc}{:02x}", c as u32));
                                } else {
                                    s.push(c);
                                }
                            }
                        }
                        None => {
                            for c in p.chars() {
                                s.push(if c == rsep { '_' } else { c });
                            }
                        }
                    }
                }
                s
            }
            _ => parts.join(&self.sep.to_string()),
        };
        Guid128::sha128(name.as_bytes())
    }

    /// The node a deletion record from the other side refers to (`dsync_mailbox_tree_find_delete`).
    pub(crate) fn find_delete(&mut self, del: &Delete) -> Option<NodeId> {
        match del.kind {
            DeleteKind::Mailbox => self.guid_hash.get(&del.guid).copied(),
            DeleteKind::Dir | DeleteKind::Unsubscribe => {
                if self.name_hashes.is_none() {
                    let mut map = HashMap::new();
                    for id in self.iter_dfs() {
                        map.entry(self.remote_name_hash(id)).or_insert(id);
                    }
                    self.name_hashes = Some(map);
                }
                self.name_hashes.as_ref().and_then(|m| m.get(&del.guid).copied())
            }
        }
    }

    /// Removes a node from its parent's list (it stays in the arena, unreachable).
    pub(crate) fn detach(&mut self, id: NodeId) {
        if let Some(p) = self.nodes[id].parent {
            self.nodes[p].children.retain(|&c| c != id);
        }
        self.nodes[id].parent = None;
    }

    /// Inserts a node among `parent`'s children before the first one with a greater name.
    pub(crate) fn attach_sorted(&mut self, id: NodeId, parent: NodeId) {
        self.nodes[id].parent = Some(parent);
        let name = self.nodes[id].name.clone();
        let pos = self.nodes[parent]
            .children
            .iter()
            .position(|&c| self.nodes[c].name.as_str() > name.as_str())
            .unwrap_or(self.nodes[parent].children.len());
        self.nodes[parent].children.insert(pos, id);
    }

    /// Moves a node under `parent`, sorted.
    pub(crate) fn move_sorted(&mut self, id: NodeId, parent: NodeId) {
        self.detach(id);
        self.attach_sorted(id, parent);
    }

    /// Sorts a node's children by name.
    pub(crate) fn sort_children(&mut self, id: NodeId) {
        let mut kids = std::mem::take(&mut self.nodes[id].children);
        kids.sort_by(|&a, &b| self.nodes[a].name.cmp(&self.nodes[b].name));
        self.nodes[id].children = kids;
    }

    /// Creates a new node named like `src_name` at `pos` among `parent`'s children.
    pub(crate) fn new_node_at(&mut self, parent: NodeId, pos: usize, name: &str, temp: bool) -> NodeId {
        let id = self.nodes.len();
        let mut n = Node::new(name, Some(parent));
        n.sync_temporary_name = temp;
        self.nodes.push(n);
        self.nodes[parent].children.insert(pos, id);
        id
    }

    /// True if `ancestor` is `node` or one of its parents.
    pub(crate) fn has_parent(&self, node: NodeId, ancestor: NodeId) -> bool {
        let mut cur = Some(node);
        while let Some(c) = cur {
            if c == ancestor {
                return true;
            }
            cur = self.nodes[c].parent;
        }
        false
    }

    /// Any descendant exists (optionally counting directories). Iterative: names are
    /// bounded in depth, but no walk should depend on it.
    pub(crate) fn has_existent_children(&self, id: NodeId, dirs_ok: bool) -> bool {
        let mut stack: Vec<NodeId> = self.nodes[id].children.clone();
        while let Some(c) = stack.pop() {
            let n = &self.nodes[c];
            if n.existence == Existence::Exists && (dirs_ok || !n.is_dir()) {
                return true;
            }
            stack.extend_from_slice(&n.children);
        }
        false
    }

    /// The node or a descendant exists.
    pub(crate) fn is_existent(&self, id: NodeId) -> bool {
        self.nodes[id].existence == Existence::Exists || self.has_existent_children(id, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_lookup_names() {
        let mut t = Tree::new('.');
        let a = t.get_name("Archive.2024");
        assert_eq!(t.full_name(a), "Archive.2024");
        assert_eq!(t.lookup_name("Archive"), t.node(a).parent);
        let i = t.get_name("INBOX");
        // New nodes go first among siblings, as in Dovecot.
        assert_eq!(t.node(ROOT).children[0], i);
        assert_eq!(t.iter_dfs().len(), 3);
    }

    #[test]
    fn delete_lookup_by_name_hash() {
        let mut t = Tree::new('.');
        let n = t.get_name("A.B");
        t.set_remote_naming('/', Some('%'));
        let del = Delete { kind: DeleteKind::Dir, guid: Guid128::sha128(b"A/B"), time: 1 };
        assert_eq!(t.find_delete(&del), Some(n));
        t.set_remote_naming('.', Some('%'));
        let del = Delete { kind: DeleteKind::Dir, guid: Guid128::sha128(b"A.B"), time: 1 };
        assert_eq!(t.find_delete(&del), Some(n));
    }
}

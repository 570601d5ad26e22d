//! Which user syncs next, and when: the replicator's queue.
//!
//! Dovecot 2.3.20's order (`replicator_user_next_sync_time`) with its bugs left out: a
//! notification only raises a user's priority (so a burst of deliveries coalesces into one or
//! two syncs), a higher priority is a bounded head start rather than strict precedence (no
//! starvation), every user gets a full sync each `full_sync_interval`, and a forced full sync
//! really is one. Unlike 2.3, a failure keeps the last good state and retries with exponential
//! backoff and a per-user jitter instead of a fixed 5 minutes; a notification does not cut the
//! backoff short, so a replica that is down is not hammered by every delivery.
//!
//! Time is plain Unix seconds passed in by the caller: the queue reads no clock, so that tests
//! (and a replay) drive it exactly.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

/// How urgently a user wants a sync (Dovecot's `enum replication_priority`, same numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Priority {
    /// Only the periodic full sync is due.
    #[default]
    None = 0,
    /// A change happened (a flag change, an expunge).
    Low = 1,
    /// New mail arrived.
    High = 2,
    /// Someone waits for this sync to finish.
    Sync = 3,
}

impl Priority {
    /// From Dovecot's number (`replicator.db`, the plugin's names map to these too).
    pub fn from_number(n: u32) -> Option<Self> {
        Some(match n {
            0 => Self::None,
            1 => Self::Low,
            2 => Self::High,
            3 => Self::Sync,
            _ => return None,
        })
    }

    /// From the replication plugin's and `doveadm replicator`'s names.
    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "none" => Self::None,
            "low" => Self::Low,
            "high" => Self::High,
            "sync" => Self::Sync,
            _ => return None,
        })
    }

    /// The name Dovecot gives it.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Low => "low",
            Self::High => "high",
            Self::Sync => "sync",
        }
    }

    /// The head start a pending change gets over the periodic syncs (2.3.20's values).
    fn head_start(self) -> u64 {
        match self {
            Self::None => 0,
            Self::Low => 15 * 60,
            Self::High => 30 * 60,
            Self::Sync => 45 * 60,
        }
    }
}

/// The timing rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Every user gets a full sync this often (seconds).
    pub full_sync_interval: u64,
    /// The first retry after a failure waits this long (seconds); each further failure
    /// doubles it.
    pub retry_base: u64,
    /// No retry waits longer than this (seconds).
    pub retry_max: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Self { full_sync_interval: 24 * 3600, retry_base: 30, retry_max: 3600 }
    }
}

/// What the queue knows about one user; also what the state directory keeps.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserRecord {
    /// The user.
    pub user: String,
    /// Pending priority.
    pub priority: Priority,
    /// When the priority was last raised.
    pub last_update: u64,
    /// When the last sync of any kind started (0: never).
    pub last_fast_sync: u64,
    /// When the last full sync started (0: never).
    pub last_full_sync: u64,
    /// When the last sync succeeded (0: never).
    pub last_success: u64,
    /// Failures since the last success.
    pub failures: u32,
    /// The next sync must be a full one.
    pub force_full: bool,
    /// The dsync state of the last successful sync (empty: none), kept across failures.
    pub state: String,
}

impl UserRecord {
    /// A copy without the state string, which can be long (one entry per mailbox) and which
    /// status answers only report as present or not.
    pub fn without_state(&self) -> Self {
        Self {
            user: self.user.clone(),
            priority: self.priority,
            last_update: self.last_update,
            last_fast_sync: self.last_fast_sync,
            last_full_sync: self.last_full_sync,
            last_success: self.last_success,
            failures: self.failures,
            force_full: self.force_full,
            state: String::new(),
        }
    }
}

/// A sync the caller should run now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// The user.
    pub user: String,
    /// A full sync (`-f`): the interval is over, or one was forced.
    pub full: bool,
    /// The state to start from (empty: none).
    pub state: String,
}

/// How a sync ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It succeeded and printed this state.
    Done(String),
    /// It failed; the user's state is kept and the sync retried later.
    Failed,
    /// The user does not exist or must not be replicated: forget them.
    Gone,
}

struct Entry {
    rec: UserRecord,
    running: bool,
    /// Bumped at every change of the due time: older heap entries are stale.
    generation: u64,
}

/// The queue. At most one sync runs per user; how many run at once is the caller's choice
/// (it pops only when it has a free slot).
pub struct Queue {
    policy: Policy,
    users: HashMap<String, Entry>,
    heap: BinaryHeap<Reverse<(u64, u64, String)>>,
    running: usize,
}

impl Queue {
    /// An empty queue.
    pub fn new(policy: Policy) -> Self {
        Self { policy, users: HashMap::new(), heap: BinaryHeap::new(), running: 0 }
    }

    /// Adds a user (as loaded from the state directory, or new with a default record); a user
    /// already known keeps what the queue has.
    pub fn add(&mut self, rec: UserRecord) {
        if self.users.contains_key(&rec.user) {
            return;
        }
        let user = rec.user.clone();
        self.users.insert(user.clone(), Entry { rec, running: false, generation: 0 });
        self.schedule(&user);
    }

    /// Forgets a user (a running sync of theirs ends without effect).
    pub fn remove(&mut self, user: &str) {
        if let Some(e) = self.users.remove(user)
            && e.running
        {
            self.running -= 1;
        }
    }

    /// A change for `user` at `now`: raises the priority (never lowers it), adding the user
    /// if unknown. Returns true if that moved the user's sync earlier.
    pub fn notify(&mut self, user: &str, priority: Priority, now: u64) -> bool {
        if !self.users.contains_key(user) {
            self.add(UserRecord { user: user.to_owned(), ..Default::default() });
        }
        let Some(e) = self.users.get_mut(user) else { return false };
        if priority <= e.rec.priority {
            return false;
        }
        e.rec.priority = priority;
        e.rec.last_update = now;
        self.schedule(user);
        true
    }

    /// Asks for a full sync of `user` next time (`replicate -f`), at `priority` or above.
    pub fn force_full(&mut self, user: &str, priority: Priority, now: u64) {
        self.notify(user, priority, now);
        if let Some(e) = self.users.get_mut(user) {
            e.rec.force_full = true;
        }
    }

    /// When the next user is due (`None`: nobody waits).
    pub fn next_due(&mut self) -> Option<u64> {
        self.drop_stale();
        self.heap.peek().map(|Reverse((due, _, _))| *due)
    }

    /// The next due user's sync, if one is due at `now`; the user counts as running until
    /// [`Queue::finish`].
    pub fn pop(&mut self, now: u64) -> Option<Job> {
        self.pop_with_record(now).map(|(job, _)| job)
    }

    /// [`Queue::pop`], with the user's record as it was before (what a record saved while the
    /// sync runs must say, so that a crash during the sync leaves it owed).
    pub fn pop_with_record(&mut self, now: u64) -> Option<(Job, UserRecord)> {
        self.drop_stale();
        if self.heap.peek().is_none_or(|Reverse((due, _, _))| *due > now) {
            return None;
        }
        let Reverse((_, _, user)) = self.heap.pop()?;
        let interval = self.policy.full_sync_interval;
        // (`drop_stale` left a live entry on top: its user is known.)
        let e = self.users.get_mut(&user)?;
        let before = e.rec.clone();
        let full = e.rec.force_full || e.rec.last_full_sync == 0 || e.rec.last_full_sync + interval <= now;
        e.rec.last_fast_sync = now;
        if full {
            e.rec.last_full_sync = now;
            e.rec.force_full = false;
        }
        // Changes from now on queue another sync.
        e.rec.priority = Priority::None;
        e.running = true;
        e.generation += 1;
        self.running += 1;
        Some((Job { user, full, state: e.rec.state.clone() }, before))
    }

    /// Another host synced `user` at `now` (Dovecot's `NOTIFY` from a `dsync-server -U`): the
    /// periodic sync moves on. The state that host printed is not ours to use (a dsync state
    /// names one side's modseqs), so the user's own state is kept.
    pub fn synced_elsewhere(&mut self, user: &str, full: bool, now: u64) {
        let Some(e) = self.users.get_mut(user) else { return };
        if e.running {
            return;
        }
        e.rec.last_fast_sync = now;
        if full {
            e.rec.last_full_sync = now;
        }
        self.schedule(user);
    }

    /// When `rec` is due under this queue's policy.
    pub fn due_of(&self, rec: &UserRecord) -> u64 {
        Self::due(&self.policy, rec)
    }

    /// Records how `user`'s running sync ended at `now`.
    pub fn finish(&mut self, user: &str, outcome: Outcome, now: u64) {
        let Some(e) = self.users.get_mut(user) else { return };
        if !e.running {
            return;
        }
        e.running = false;
        self.running -= 1;
        match outcome {
            Outcome::Done(state) => {
                e.rec.state = state;
                e.rec.failures = 0;
                e.rec.last_success = now;
            }
            Outcome::Failed => {
                e.rec.failures = e.rec.failures.saturating_add(1);
                // A failed full sync is owed again.
                if e.rec.last_full_sync == e.rec.last_fast_sync {
                    e.rec.force_full = true;
                }
            }
            Outcome::Gone => {
                self.users.remove(user);
                return;
            }
        }
        self.schedule(user);
    }

    /// Syncs running now.
    pub fn running(&self) -> usize {
        self.running
    }

    /// Users known.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// No user known.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// A user's record and whether their sync runs now.
    pub fn get(&self, user: &str) -> Option<(&UserRecord, bool)> {
        self.users.get(user).map(|e| (&e.rec, e.running))
    }

    /// Every user's record (for saving and for status), in no order.
    pub fn records(&self) -> impl Iterator<Item = (&UserRecord, bool)> {
        self.users.values().map(|e| (&e.rec, e.running))
    }

    /// When `rec` is due (2.3.20's rule, with backoff after failures).
    fn due(policy: &Policy, rec: &UserRecord) -> u64 {
        let wanted = if rec.priority == Priority::None {
            if rec.last_full_sync == 0 { 0 } else { rec.last_full_sync.saturating_add(policy.full_sync_interval) }
        } else if rec.last_fast_sync == 0 {
            // Never synced: before everything else, higher priorities first.
            3 - rec.priority as u64
        } else {
            rec.last_update.saturating_sub(rec.priority.head_start())
        };
        if rec.failures == 0 {
            return wanted;
        }
        // After a failure the retry is due when the backoff is over, whatever was pending
        // (a failed periodic sync does not wait for the next interval).
        let shift = (rec.failures - 1).min(32);
        let wait = policy.retry_base.saturating_mul(1u64 << shift).min(policy.retry_max);
        // Up to a fifth more, fixed per user and attempt, so that users who failed together
        // do not all retry in the same second.
        let jitter = wait / 5 * (fnv(rec.user.as_bytes(), rec.failures) % 1000) / 1000;
        rec.last_fast_sync.saturating_add(wait + jitter)
    }

    fn schedule(&mut self, user: &str) {
        let Some(e) = self.users.get_mut(user) else { return };
        if e.running {
            return;
        }
        e.generation += 1;
        let due = Self::due(&self.policy, &e.rec);
        self.heap.push(Reverse((due, e.generation, user.to_owned())));
        // Stale entries are dropped lazily; keep them from outgrowing the users.
        if self.heap.len() > 2 * self.users.len() + 64 {
            self.rebuild();
        }
    }

    fn is_live(&self, generation: u64, user: &str) -> bool {
        self.users.get(user).is_some_and(|e| !e.running && e.generation == generation)
    }

    fn drop_stale(&mut self) {
        while let Some(Reverse((_, g, u))) = self.heap.peek() {
            if self.is_live(*g, u) {
                break;
            }
            self.heap.pop();
        }
    }

    fn rebuild(&mut self) {
        let heap = std::mem::take(&mut self.heap);
        self.heap = heap.into_iter().filter(|Reverse((_, g, u))| self.is_live(*g, u)).collect();
    }
}

/// FNV-1a of `bytes` and `n`: a fixed spread, not a secret.
fn fnv(bytes: &[u8], n: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes.iter().chain(&n.to_le_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000;

    fn synced(user: &str, at: u64) -> UserRecord {
        UserRecord {
            user: user.into(),
            last_update: at,
            last_fast_sync: at,
            last_full_sync: at,
            last_success: at,
            state: format!("state-of-{user}"),
            ..Default::default()
        }
    }

    #[test]
    fn a_burst_of_notifications_is_one_sync() {
        let mut q = Queue::new(Policy::default());
        q.add(synced("alice", T0));
        assert_eq!(q.pop(T0 + 1), None, "nothing pending");
        for i in 0..100 {
            q.notify("alice", Priority::High, T0 + 10 + i / 50);
        }
        let job = q.pop(T0 + 12).expect("due");
        assert_eq!(job, Job { user: "alice".into(), full: false, state: "state-of-alice".into() });
        assert_eq!(q.pop(T0 + 12), None, "one sync per user at a time, and the burst was one");
        // Changes during the sync queue exactly one more.
        q.notify("alice", Priority::Low, T0 + 13);
        q.notify("alice", Priority::Low, T0 + 13);
        assert_eq!(q.pop(T0 + 13), None, "still running");
        q.finish("alice", Outcome::Done("s2".into()), T0 + 14);
        assert_eq!(q.pop(T0 + 14).map(|j| j.state), Some("s2".into()));
        q.finish("alice", Outcome::Done("s3".into()), T0 + 15);
        assert_eq!(q.pop(T0 + 15), None);
    }

    #[test]
    fn higher_priority_first_but_a_bounded_head_start() {
        let mut q = Queue::new(Policy::default());
        for u in ["low-old", "high-new"] {
            q.add(synced(u, T0));
        }
        q.notify("low-old", Priority::Low, T0 + 100);
        q.notify("high-new", Priority::High, T0 + 200);
        assert_eq!(q.pop(T0 + 200).unwrap().user, "high-new");
        // A low change waiting over 15 minutes more than a high one goes first.
        let mut q = Queue::new(Policy::default());
        for u in ["low-old", "high-new"] {
            q.add(synced(u, T0));
        }
        q.notify("low-old", Priority::Low, T0 + 100);
        q.notify("high-new", Priority::High, T0 + 100 + 16 * 60);
        assert_eq!(q.pop(T0 + 100 + 16 * 60).unwrap().user, "low-old");
    }

    #[test]
    fn never_synced_users_come_first_and_fully() {
        let mut q = Queue::new(Policy::default());
        q.add(synced("old", T0));
        q.notify("old", Priority::Sync, T0 + 5);
        q.add(UserRecord { user: "new".into(), ..Default::default() });
        let job = q.pop(T0 + 5).unwrap();
        assert_eq!((job.user.as_str(), job.full, job.state.as_str()), ("new", true, ""));
    }

    #[test]
    fn every_interval_a_full_sync_and_forced_ones_are_full() {
        let p = Policy { full_sync_interval: 3600, ..Default::default() };
        let mut q = Queue::new(p);
        q.add(synced("a", T0));
        assert_eq!(q.next_due(), Some(T0 + 3600));
        assert_eq!(q.pop(T0 + 3599), None);
        assert!(q.pop(T0 + 3600).unwrap().full);
        q.finish("a", Outcome::Done("s".into()), T0 + 3601);
        q.notify("a", Priority::Low, T0 + 3700);
        assert!(!q.pop(T0 + 3700).unwrap().full, "a change alone is incremental");
        q.finish("a", Outcome::Done("s".into()), T0 + 3701);
        q.force_full("a", Priority::High, T0 + 3800);
        let job = q.pop(T0 + 3800).unwrap();
        assert!(job.full, "-f is a full sync (2.3 dropped it)");
        assert_eq!(job.state, "s", "the state still goes along; -f decides");
    }

    #[test]
    fn failures_keep_the_state_and_back_off_exponentially() {
        let p = Policy { full_sync_interval: 24 * 3600, retry_base: 30, retry_max: 600 };
        let mut q = Queue::new(p);
        q.add(synced("a", T0));
        q.notify("a", Priority::High, T0 + 10);
        let mut now = T0 + 10;
        let mut waits = Vec::new();
        for _ in 0..7 {
            let job = q.pop(now).expect("due");
            assert_eq!(job.state, "state-of-a", "a failure keeps the last good state");
            q.finish("a", Outcome::Failed, now);
            // New deliveries do not cut the wait short.
            q.notify("a", Priority::High, now + 1);
            let due = q.next_due().unwrap();
            assert_eq!(q.pop(due - 1), None);
            waits.push(due - now);
            now = due;
        }
        for (i, w) in waits.iter().enumerate() {
            let base = (30u64 << i).min(600);
            assert!(*w >= base && *w <= base + base / 5, "retry {i}: waited {w}s, base {base}s: {waits:?}");
        }
        q.pop(now).unwrap();
        q.finish("a", Outcome::Done("fresh".into()), now);
        assert_eq!(q.get("a").unwrap().0.failures, 0);
        q.notify("a", Priority::High, now + 5);
        assert_eq!(q.pop(now + 5).map(|j| j.state), Some("fresh".into()), "back to immediate");
    }

    #[test]
    fn a_failed_periodic_sync_retries_after_the_backoff_and_fully() {
        let p = Policy { full_sync_interval: 3600, retry_base: 60, retry_max: 600 };
        let mut q = Queue::new(p);
        q.add(synced("a", T0));
        let job = q.pop(T0 + 3600).unwrap();
        assert!(job.full);
        q.finish("a", Outcome::Failed, T0 + 3600);
        let due = q.next_due().unwrap();
        assert!((T0 + 3660..=T0 + 3672).contains(&due), "due {}", due - T0);
        let job = q.pop(due).unwrap();
        assert!(job.full, "the full sync is still owed");
    }

    #[test]
    fn jitter_spreads_users_that_failed_together() {
        let mut q = Queue::new(Policy { retry_base: 300, ..Default::default() });
        let users: Vec<String> = (0..200).map(|i| format!("user{i}")).collect();
        for u in &users {
            q.add(synced(u, T0));
            q.notify(u, Priority::High, T0 + 1);
        }
        for _ in &users {
            let j = q.pop(T0 + 1).unwrap();
            q.finish(&j.user, Outcome::Failed, T0 + 1);
        }
        let dues: std::collections::BTreeSet<u64> =
            users.iter().map(|u| Queue::due(&q.policy, q.get(u).unwrap().0)).collect();
        assert!(dues.len() > 40, "{} distinct retry times for 200 users", dues.len());
        assert!(dues.iter().all(|d| (T0 + 301..=T0 + 1 + 360).contains(d)), "{dues:?}");
    }

    #[test]
    fn gone_users_are_forgotten_and_the_heap_stays_small() {
        let mut q = Queue::new(Policy::default());
        q.add(synced("a", T0));
        q.notify("a", Priority::Low, T0 + 1);
        q.pop(T0 + 1).unwrap();
        q.finish("a", Outcome::Gone, T0 + 2);
        assert!(q.is_empty() && q.running() == 0);
        assert_eq!(q.next_due(), None);
        for i in 0..10_000 {
            q.notify("b", if i % 2 == 0 { Priority::Low } else { Priority::High }, T0 + i);
            if i % 2 == 1 {
                let j = q.pop(T0 + i).unwrap();
                q.finish(&j.user, Outcome::Done(String::new()), T0 + i);
            }
        }
        assert!(q.heap.len() <= 2 * q.len() + 65, "heap of {}", q.heap.len());
    }
}

//! The running replicator: the queue behind a lock, a dispatcher that starts due syncs (at
//! most `max_parallel` at once, one per user), and the records kept on disk as they change.
//!
//! ```text
//!   change feeds ──notify()──►  Queue (one lock)  ◄──finish── sync threads (≤ max_parallel)
//!   (FIFO, sockets, watcher)        │  pop due users                ▲
//!                                   ▼                               │
//!                              dispatcher ──spawn one thread per job┘──► Syncer::sync(job)
//! ```
//!
//! What reaches the disk, and when, is what makes a crash harmless: a user's record is saved
//! whenever a notification raises their priority and whenever one of their syncs ends. A
//! record saved while a sync runs still says the sync is owed (the timestamps from before it
//! started), so a service killed at any moment starts again with every pending user pending
//! and every user's last good state. The sync itself is done by a [`Syncer`], which knows
//! about processes and destinations; this module knows neither.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::queue::{Job, Outcome, Policy, Priority, Queue, UserRecord};
use super::state_db::{StateDir, StateError};
use crate::userdb::wildcard_match;

/// How a sync ended, as the [`Syncer`] tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncResult {
    /// It succeeded and printed this state; `changed` if the source changed while it ran (the
    /// user is queued again).
    Done {
        /// The new state.
        state: String,
        /// Changes happened during the sync.
        changed: bool,
    },
    /// It failed (the message says why); retried later from the last good state.
    Failed(String),
    /// The user does not exist or must not be replicated: forgotten.
    Gone(String),
}

/// Runs one user's sync to its end.
pub trait Syncer: Send + Sync {
    /// Syncs `job.user` from `job.state` (empty: none yet), fully if `job.full`.
    fn sync(&self, job: &Job) -> SyncResult;
}

/// Which users may be replicated; answers for notifications from anyone who can write to a
/// feed.
pub trait Directory: Send + Sync {
    /// True if `user` may be replicated.
    fn allowed(&self, user: &str) -> bool;
    /// Every user that may be replicated (for `ADD` with a mask).
    fn list(&self) -> Result<Vec<String>, String>;
    /// The uid owning `user`'s mail (to check who may ask for a user's sync).
    fn uid_of(&self, user: &str) -> Option<u32>;
}

/// The service's settings.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Syncs at once.
    pub max_parallel: usize,
    /// The queue's timing.
    pub policy: Policy,
}

/// Most callers waiting for a sync at once (each holds a connection); more are answered with
/// a failure at once, as if their sync had failed.
const MAX_WAITERS: usize = 10_000;
/// The dispatcher looks at the clock at least this often (a clock that jumps is noticed).
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// A user's sync that runs now.
#[derive(Debug, Clone)]
pub struct RunningSync {
    /// The user.
    pub user: String,
    /// `full`, `incremental` (from a state) or `normal` (no state yet): doveadm's words.
    pub kind: &'static str,
    /// When it started (Unix seconds).
    pub started: u64,
}

/// One user's line of the status.
#[derive(Debug, Clone)]
pub struct UserStatus {
    /// The record (as the queue holds it; a running user's shows the sync's start), without
    /// its state string: a status of every user must not copy every state.
    pub record: UserRecord,
    /// The record holds a state (the next sync can be incremental).
    pub has_state: bool,
    /// A sync of theirs runs now.
    pub running: bool,
    /// When their next sync is due (Unix seconds; in the past: as soon as a slot is free).
    pub next_due: u64,
    /// The last failure's time and message, since the service started.
    pub last_error: Option<(u64, String)>,
}

/// The counts of `doveadm replicator status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overview {
    /// Users pending with priority sync, high, low.
    pub queued: [usize; 3],
    /// Users whose retry is due now.
    pub queued_failed: usize,
    /// Users whose periodic full sync is due now.
    pub queued_full: usize,
    /// Users whose retry is not due yet.
    pub waiting_failed: usize,
    /// Syncs running.
    pub running: usize,
    /// Users known.
    pub users: usize,
}

struct Inner {
    queue: Queue,
    stopping: bool,
    /// The record of each running user from before the sync started, for saving.
    running: HashMap<String, (RunningSync, UserRecord)>,
    /// Callers waiting for the user's next sync to start and end.
    waiting: HashMap<String, Vec<Sender<bool>>>,
    /// Callers waiting for the user's running sync to end.
    in_flight: HashMap<String, Vec<Sender<bool>>>,
    waiters: usize,
    last_error: HashMap<String, (u64, String)>,
    /// Syncs that ended whose records are not saved yet: a stop waits for them too.
    saving: usize,
}

/// The replicator's core; shared by the feeds, the dispatcher and the sync threads.
pub struct Service {
    inner: Mutex<Inner>,
    wake: Condvar,
    states: StateDir,
    /// Serializes saves, each of the latest record (so an older one never lands last).
    save_lock: Mutex<()>,
    settings: Settings,
    syncer: Arc<dyn Syncer>,
    directory: Arc<dyn Directory>,
}

/// Unix seconds now.
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Service {
    /// A service over `states`, with `users` known from the start: their saved records are
    /// loaded, users without one are added as new (due at once, as 2.3 does with users it has
    /// no record for). Saved records of users not in `users` are left on disk untouched.
    pub fn new(
        settings: Settings,
        states: StateDir,
        users: &[String],
        syncer: Arc<dyn Syncer>,
        directory: Arc<dyn Directory>,
    ) -> Result<Arc<Self>, StateError> {
        let mut queue = Queue::new(settings.policy);
        states.remove_leftovers()?;
        let mut saved: HashMap<String, UserRecord> = states.load()?.into_iter().map(|r| (r.user.clone(), r)).collect();
        for u in users {
            let rec = saved.remove(u).unwrap_or_else(|| UserRecord { user: u.clone(), ..Default::default() });
            queue.add(rec);
        }
        if !saved.is_empty() {
            tracing::info!("{} saved records of users no longer configured are kept on disk, unused", saved.len());
        }
        Ok(Arc::new(Self {
            inner: Mutex::new(Inner {
                queue,
                stopping: false,
                running: HashMap::new(),
                waiting: HashMap::new(),
                in_flight: HashMap::new(),
                waiters: 0,
                last_error: HashMap::new(),
                saving: 0,
            }),
            wake: Condvar::new(),
            states,
            save_lock: Mutex::new(()),
            settings,
            syncer,
            directory,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The user directory the service was made with.
    pub fn directory(&self) -> &dyn Directory {
        &*self.directory
    }

    /// A change for `user`: raises their priority. Refused (false) for a user that may not be
    /// replicated.
    pub fn notify(&self, user: &str, priority: Priority) -> bool {
        if !self.directory.allowed(user) {
            tracing::warn!("notification for {user:?} ignored: not a user this replicator serves");
            return false;
        }
        let raised = self.lock().queue.notify(user, priority, now());
        if raised {
            self.persist(user);
            self.wake.notify_all();
        }
        true
    }

    /// Like [`Service::notify`] with priority sync, and a receiver that gets whether the
    /// user's next sync (one that starts after this call) succeeded.
    pub fn notify_sync(&self, user: &str) -> Receiver<bool> {
        let (tx, rx) = mpsc::channel();
        if !self.directory.allowed(user) {
            tracing::warn!("sync request for {user:?} refused: not a user this replicator serves");
            let _ = tx.send(false);
            return rx;
        }
        {
            let mut g = self.lock();
            if g.waiters >= MAX_WAITERS || g.stopping {
                drop(g);
                let _ = tx.send(false);
                return rx;
            }
            g.waiters += 1;
            g.waiting.entry(user.to_owned()).or_default().push(tx);
            g.queue.notify(user, Priority::Sync, now());
        }
        self.persist(user);
        self.wake.notify_all();
        rx
    }

    /// Adds `user` if unknown (due at once when new). False for a user that may not be
    /// replicated.
    pub fn add(&self, user: &str) -> bool {
        self.replicate(&[user], Priority::None, false) == 1
    }

    /// `replicate` for many users at once (a mask over a whole host): the queue is updated
    /// under one lock and the changed records are saved as one batch, with one directory
    /// fsync, so that the request is answered in time. `full`: a full sync at `priority` or
    /// sooner; else priority `None` adds the users not yet known, another raises theirs. How
    /// many users it applied to (those this replicator may serve).
    pub fn replicate(&self, users: &[impl AsRef<str>], priority: Priority, full: bool) -> usize {
        let allowed: Vec<&str> = users.iter().map(AsRef::as_ref).filter(|u| self.directory.allowed(u)).collect();
        let t = now();
        let changed: Vec<&str> = {
            let mut g = self.lock();
            allowed
                .iter()
                .filter(|u| {
                    if full {
                        g.queue.force_full(u, priority, t);
                        true
                    } else if priority == Priority::None {
                        let new = g.queue.get(u).is_none();
                        if new {
                            g.queue.add(UserRecord { user: (**u).to_owned(), ..Default::default() });
                        }
                        new
                    } else {
                        g.queue.notify(u, priority, t)
                    }
                })
                .copied()
                .collect()
        };
        if !changed.is_empty() {
            self.persist_all(&changed);
            self.wake.notify_all();
        }
        allowed.len()
    }

    /// Forgets `user` and their record; false if unknown.
    pub fn remove(&self, user: &str) -> bool {
        let known = {
            let mut g = self.lock();
            let known = g.queue.get(user).is_some();
            g.queue.remove(user);
            g.running.remove(user);
            answer(&mut g, user, false, true);
            known
        };
        if known {
            self.persist(user);
        }
        known
    }

    /// Another host synced `user` (`NOTIFY`).
    pub fn synced_elsewhere(&self, user: &str, full: bool) {
        self.lock().queue.synced_elsewhere(user, full, now());
        self.persist(user);
        self.wake.notify_all();
    }

    /// The users known whose names match `mask` (Dovecot's `*` and `?`).
    pub fn known_matching(&self, mask: &str) -> Vec<String> {
        let g = self.lock();
        let mut v: Vec<String> =
            g.queue.records().filter(|(r, _)| wildcard_match(mask, &r.user)).map(|(r, _)| r.user.clone()).collect();
        v.sort();
        v
    }

    /// Stops starting syncs; [`Service::run`] returns once the running ones ended.
    pub fn stop(&self) {
        self.lock().stopping = true;
        self.wake.notify_all();
    }

    /// True once [`Service::stop`] was called.
    pub fn stopping(&self) -> bool {
        self.lock().stopping
    }

    /// The counts `doveadm replicator status` shows.
    pub fn overview(&self) -> Overview {
        let g = self.lock();
        let t = now();
        let mut o = Overview { running: g.running.len(), users: g.queue.len(), ..Default::default() };
        for (r, running) in g.queue.records() {
            if running {
                continue;
            }
            match r.priority {
                Priority::Sync => o.queued[0] += 1,
                Priority::High => o.queued[1] += 1,
                Priority::Low => o.queued[2] += 1,
                Priority::None => {
                    let due = g.queue.due_of(r) <= t;
                    match (r.failures > 0, due) {
                        (true, true) => o.queued_failed += 1,
                        (true, false) => o.waiting_failed += 1,
                        (false, true) => o.queued_full += 1,
                        (false, false) => {}
                    }
                }
            }
        }
        o
    }

    /// The users matching `mask`, sorted by name.
    pub fn users(&self, mask: &str) -> Vec<UserStatus> {
        let g = self.lock();
        let mut v: Vec<UserStatus> = g
            .queue
            .records()
            .filter(|(r, _)| wildcard_match(mask, &r.user))
            .map(|(r, running)| UserStatus {
                record: r.without_state(),
                has_state: !r.state.is_empty(),
                running,
                next_due: if running { 0 } else { g.queue.due_of(r) },
                last_error: g.last_error.get(&r.user).cloned(),
            })
            .collect();
        v.sort_by(|a, b| a.record.user.cmp(&b.record.user));
        v
    }

    /// The syncs running now.
    pub fn running(&self) -> Vec<RunningSync> {
        let g = self.lock();
        let mut v: Vec<RunningSync> = g.running.values().map(|(r, _)| r.clone()).collect();
        v.sort_by(|a, b| a.user.cmp(&b.user));
        v
    }

    /// The dispatcher: starts due syncs until [`Service::stop`], then waits for the running
    /// ones to end.
    pub fn run(self: &Arc<Self>) {
        let mut g = self.lock();
        loop {
            if g.stopping {
                // Nobody waits for a sync that will not start.
                let users: Vec<String> = g.waiting.keys().cloned().collect();
                for u in users {
                    let w = g.waiting.remove(&u).unwrap_or_default();
                    g.waiters = g.waiters.saturating_sub(w.len());
                    for tx in w {
                        let _ = tx.send(false);
                    }
                }
                if g.running.is_empty() && g.saving == 0 {
                    break;
                }
                g = self.wake.wait(g).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            let t = now();
            while g.running.len() < self.settings.max_parallel {
                let Some((job, before)) = g.queue.pop_with_record(t) else { break };
                let info = RunningSync { user: job.user.clone(), kind: kind(&job), started: t };
                g.running.insert(job.user.clone(), (info, before));
                if let Some(w) = g.waiting.remove(&job.user) {
                    g.in_flight.entry(job.user.clone()).or_default().extend(w);
                }
                let me = Arc::clone(self);
                let user = job.user.clone();
                let spawned = std::thread::Builder::new().name("sync".into()).spawn(move || me.sync_one(job));
                if let Err(e) = spawned {
                    // Out of threads: a failure like any other, retried after the backoff.
                    let why = format!("starting a sync thread: {e}");
                    tracing::error!(user = %user, "{why}");
                    g.running.remove(&user);
                    g.queue.finish(&user, Outcome::Failed, t);
                    g.last_error.insert(user.clone(), (t, why));
                    answer(&mut g, &user, false, false);
                    break;
                }
            }
            let wait = if g.running.len() >= self.settings.max_parallel {
                MAX_SLEEP
            } else {
                match g.queue.next_due() {
                    Some(d) => Duration::from_secs(d.saturating_sub(t).max(1)).min(MAX_SLEEP),
                    None => MAX_SLEEP,
                }
            };
            g = self.wake.wait_timeout(g, wait).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    fn sync_one(&self, job: Job) {
        tracing::info!(user = %job.user, "sync started ({})", kind(&job));
        let started = std::time::Instant::now();
        let result = self.syncer.sync(&job);
        let t = now();
        let ok = matches!(result, SyncResult::Done { .. });
        {
            let mut g = self.lock();
            g.saving += 1;
            if g.running.remove(&job.user).is_none() {
                // Removed while it ran.
                answer(&mut g, &job.user, false, false);
            } else {
                match &result {
                    SyncResult::Done { state, changed } => {
                        g.queue.finish(&job.user, Outcome::Done(state.clone()), t);
                        if *changed {
                            g.queue.notify(&job.user, Priority::Low, t);
                        }
                    }
                    SyncResult::Failed(why) => {
                        g.queue.finish(&job.user, Outcome::Failed, t);
                        g.last_error.insert(job.user.clone(), (t, why.clone()));
                    }
                    SyncResult::Gone(why) => {
                        g.queue.finish(&job.user, Outcome::Gone, t);
                        g.last_error.insert(job.user.clone(), (t, why.clone()));
                    }
                }
                let gone = matches!(result, SyncResult::Gone(_));
                answer(&mut g, &job.user, ok, gone);
            }
        }
        let secs = started.elapsed().as_secs_f64();
        match &result {
            SyncResult::Done { changed: false, .. } => tracing::info!(user = %job.user, "sync done in {secs:.1} s"),
            SyncResult::Done { changed: true, .. } => {
                tracing::info!(user = %job.user, "sync done in {secs:.1} s; changes during it, queued again");
            }
            SyncResult::Failed(why) => tracing::warn!(user = %job.user, "sync failed after {secs:.1} s: {why}"),
            SyncResult::Gone(why) => tracing::warn!(user = %job.user, "user removed from the replicator: {why}"),
        }
        self.persist(&job.user);
        self.lock().saving -= 1;
        self.wake.notify_all();
    }

    /// Saves `user`'s record as the queue holds it now (or removes it if the user is gone).
    fn persist(&self, user: &str) {
        self.persist_all(&[user]);
    }

    /// Saves these users' records as the queue holds them now, the saved ones in one batch
    /// (one directory fsync); a user the queue no longer has loses their record. A running
    /// user's record keeps the timestamps from before the sync, so that it stays owed if the
    /// service dies before the sync ends.
    fn persist_all(&self, users: &[&str]) {
        let _serial = self.save_lock.lock().unwrap_or_else(PoisonError::into_inner);
        let (records, gone): (Vec<UserRecord>, Vec<&str>) = {
            let g = self.lock();
            let mut records = Vec::with_capacity(users.len());
            let mut gone = Vec::new();
            for &user in users {
                match g.queue.get(user) {
                    Some((r, running)) => {
                        let mut r = r.clone();
                        if running && let Some((_, before)) = g.running.get(user) {
                            r.last_fast_sync = before.last_fast_sync;
                            r.last_full_sync = before.last_full_sync;
                            r.force_full = before.force_full;
                            r.priority = r.priority.max(before.priority);
                            r.last_update = r.last_update.max(before.last_update);
                        }
                        records.push(r);
                    }
                    None => gone.push(user),
                }
            }
            (records, gone)
        };
        if !records.is_empty()
            && let Err(e) = self.states.save_all(&records)
        {
            tracing::error!("saving {} replicator records: {e}", records.len());
        }
        for user in gone {
            if let Err(e) = self.states.remove(user) {
                tracing::error!(user = %user, "removing the replicator record: {e}");
            }
        }
    }
}

/// `full`, `incremental` (from a state) or `normal` (no state yet): doveadm's words for a
/// sync.
fn kind(job: &Job) -> &'static str {
    if job.full {
        "full"
    } else if job.state.is_empty() {
        "normal"
    } else {
        "incremental"
    }
}

/// Answers the callers waiting for `user`'s sync that just ended (`ok`); with `all`, those
/// waiting for a later one too (the user is gone).
fn answer(g: &mut Inner, user: &str, ok: bool, all: bool) {
    let mut done = g.in_flight.remove(user).unwrap_or_default();
    if all {
        done.extend(g.waiting.remove(user).unwrap_or_default());
    }
    g.waiters = g.waiters.saturating_sub(done.len());
    for tx in done {
        let _ = tx.send(ok);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Answers each sync with what `script` says for the user (default: done, state
    /// "s<n>"), after waiting for `gate` if set; counts calls and the most at once.
    #[derive(Default)]
    struct Fake {
        calls: Mutex<Vec<Job>>,
        now: AtomicUsize,
        most: AtomicUsize,
        fail: Mutex<Vec<String>>,
        gate: Mutex<Option<Receiver<()>>>,
        hold: Duration,
    }

    impl Syncer for Fake {
        fn sync(&self, job: &Job) -> SyncResult {
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(n, Ordering::SeqCst);
            let gate = self.gate.lock().unwrap().take();
            if let Some(g) = gate {
                let _ = g.recv_timeout(Duration::from_secs(20));
            }
            std::thread::sleep(self.hold);
            let count = {
                let mut c = self.calls.lock().unwrap();
                c.push(job.clone());
                c.len()
            };
            self.now.fetch_sub(1, Ordering::SeqCst);
            if self.fail.lock().unwrap().contains(&job.user) {
                SyncResult::Failed("replica down".into())
            } else if job.user.starts_with("gone") {
                SyncResult::Gone("no such user".into())
            } else {
                SyncResult::Done { state: format!("s{count}"), changed: false }
            }
        }
    }

    struct Dir;
    impl Directory for Dir {
        fn allowed(&self, user: &str) -> bool {
            !user.starts_with('x')
        }
        fn list(&self) -> Result<Vec<String>, String> {
            Ok(vec!["alice".into(), "bob".into()])
        }
        fn uid_of(&self, _: &str) -> Option<u32> {
            Some(1000)
        }
    }

    fn service(dir: &std::path::Path, users: &[&str], fake: Arc<Fake>, parallel: usize) -> Arc<Service> {
        let settings = Settings { max_parallel: parallel, policy: Policy { retry_base: 3600, ..Policy::default() } };
        let users: Vec<String> = users.iter().map(|u| (*u).to_owned()).collect();
        Service::new(settings, StateDir::open(dir).unwrap(), &users, fake, Arc::new(Dir)).unwrap()
    }

    fn start(s: &Arc<Service>) -> std::thread::JoinHandle<()> {
        let s = Arc::clone(s);
        std::thread::spawn(move || s.run())
    }

    fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let until = std::time::Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(std::time::Instant::now() < until, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn saved(dir: &std::path::Path, user: &str) -> UserRecord {
        StateDir::open(dir).unwrap().load().unwrap().into_iter().find(|r| r.user == user).expect("saved")
    }

    #[test]
    fn new_users_sync_at_once_at_most_n_at_a_time_and_their_states_are_saved() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Fake { hold: Duration::from_millis(50), ..Default::default() });
        let users = ["u1", "u2", "u3", "u4", "u5", "u6"];
        let s = service(dir.path(), &users, Arc::clone(&fake), 2);
        let t = start(&s);
        wait_for("six syncs", || fake.calls.lock().unwrap().len() == 6);
        assert!(fake.most.load(Ordering::SeqCst) <= 2, "at most max_parallel at once");
        assert!(fake.calls.lock().unwrap().iter().all(|j| j.full && j.state.is_empty()), "first syncs are full");
        // A stop waits for the running syncs and their records.
        s.stop();
        t.join().unwrap();
        for u in users {
            let r = saved(dir.path(), u);
            assert!(r.state.starts_with('s') && r.last_success > 0 && r.failures == 0, "{r:?}");
        }
        // A new service over the same directory has nothing due: every user was just synced.
        let fake2 = Arc::new(Fake::default());
        let s2 = service(dir.path(), &users, Arc::clone(&fake2), 2);
        assert_eq!(s2.overview(), Overview { users: 6, ..Default::default() });
    }

    #[test]
    fn a_burst_is_one_or_two_syncs_and_a_sync_waiter_gets_the_next_sync() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Fake::default());
        let s = service(dir.path(), &["alice"], Arc::clone(&fake), 4);
        let t = start(&s);
        wait_for("the first sync", || fake.calls.lock().unwrap().len() == 1 && s.running().is_empty());
        let (open, gate) = mpsc::channel();
        *fake.gate.lock().unwrap() = Some(gate);
        for _ in 0..100 {
            assert!(s.notify("alice", Priority::High));
        }
        wait_for("the burst's sync to start", || !s.running().is_empty());
        // Asked while a sync runs: answered after the following one.
        let rx = s.notify_sync("alice");
        open.send(()).unwrap();
        assert!(rx.recv_timeout(Duration::from_secs(20)).unwrap(), "the waiter's sync succeeded");
        let calls = fake.calls.lock().unwrap().clone();
        assert_eq!(calls.len(), 3, "first, the burst, the waiter's: {calls:?}");
        assert_eq!(calls[1].state, "s1", "incremental from the saved state");
        assert!(!calls[1].full && !calls[2].full);
        // Refused users never enter the queue.
        assert!(!s.notify("xavier", Priority::High));
        assert!(!s.notify_sync("xavier").recv().unwrap());
        assert_eq!(s.overview().users, 1);
        s.stop();
        t.join().unwrap();
    }

    #[test]
    fn a_failure_keeps_the_state_and_a_record_saved_during_a_sync_keeps_it_owed() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Fake::default());
        let s = service(dir.path(), &["alice", "gone1"], Arc::clone(&fake), 4);
        let t = start(&s);
        wait_for("the first syncs", || fake.calls.lock().unwrap().len() == 2 && s.running().is_empty());
        assert_eq!(s.overview().users, 1, "a user the sync says is gone is forgotten");
        wait_for("alice's record", || saved_exists(dir.path(), "alice") && saved(dir.path(), "alice").last_success > 0);
        let good = saved(dir.path(), "alice");
        // A sync that hangs: meanwhile a notification is saved. Killed there, the service
        // would find alice still owed a sync, from her last good state.
        let (open, gate) = mpsc::channel();
        *fake.gate.lock().unwrap() = Some(gate);
        s.notify("alice", Priority::Low);
        wait_for("the sync to start", || !s.running().is_empty());
        s.notify("alice", Priority::High);
        let during = saved(dir.path(), "alice");
        assert_eq!(during.priority, Priority::High);
        assert_eq!((during.last_fast_sync, during.state.as_str()), (good.last_fast_sync, good.state.as_str()));
        // It fails: the state is kept, the failure counted, the retry waits.
        fake.fail.lock().unwrap().push("alice".into());
        open.send(()).unwrap();
        wait_for("the failure", || s.users("alice")[0].record.failures == 1);
        wait_for("the record", || saved(dir.path(), "alice").failures == 1);
        let after = saved(dir.path(), "alice");
        assert_eq!(after.state, good.state, "the last good state is kept");
        let st = &s.users("alice")[0];
        assert_eq!(st.last_error.as_ref().map(|e| e.1.as_str()), Some("replica down"));
        assert!(st.next_due > now() + 60, "backoff, not a retry at once");
        assert_eq!(s.overview().queued[1], 1, "still pending at high, as Dovecot counts it");
        assert!(!saved_exists(dir.path(), "gone1"));
        s.stop();
        t.join().unwrap();
    }

    #[test]
    fn a_request_over_many_users_is_saved_for_all_before_it_is_answered_and_each_gets_a_full_sync() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Fake::default());
        let names: Vec<String> = (0..300).map(|i| format!("u{i:03}")).collect();
        let users: Vec<&str> = names.iter().map(String::as_str).collect();
        let s = service(dir.path(), &users, Arc::clone(&fake), 1);
        let t = start(&s);
        wait_for("the first syncs", || fake.calls.lock().unwrap().len() == 300 && s.running().is_empty());
        let before = fake.calls.lock().unwrap().len();
        // One sync at a time, and the first one held: the request's records must already be on
        // disk for every user while the syncs have not run.
        let (open, gate) = mpsc::channel();
        *fake.gate.lock().unwrap() = Some(gate);
        let mut asked = names.clone();
        asked.push("xavier".into());
        assert_eq!(s.replicate(&asked, Priority::Low, true), 300, "the refused user is not counted");
        let on_disk = StateDir::open(dir.path()).unwrap().load().unwrap();
        assert_eq!(on_disk.len(), 300);
        for r in &on_disk {
            let running = s.running().iter().any(|x| x.user == r.user);
            assert!(
                running || (r.force_full && r.priority == Priority::Low),
                "{r:?} running: {:?}",
                s.running().iter().map(|x| x.user.clone()).collect::<Vec<_>>()
            );
            assert!(r.state.starts_with('s'), "the state is kept for the full sync: {r:?}");
        }
        open.send(()).unwrap();
        wait_for("a full sync of every user", || {
            fake.calls.lock().unwrap().len() == before + 300 && s.running().is_empty()
        });
        let calls = fake.calls.lock().unwrap().clone();
        let mut synced: Vec<&str> = calls[before..].iter().map(|j| j.user.as_str()).collect();
        assert!(calls[before..].iter().all(|j| j.full), "every one full");
        synced.sort_unstable();
        assert_eq!(synced, users, "each user once");
        s.stop();
        t.join().unwrap();
        assert!(
            StateDir::open(dir.path()).unwrap().load().unwrap().iter().all(|r| !r.force_full && r.last_full_sync > 0)
        );
    }

    fn saved_exists(dir: &std::path::Path, user: &str) -> bool {
        StateDir::open(dir).unwrap().load().unwrap().iter().any(|r| r.user == user)
    }
}

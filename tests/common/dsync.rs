//! dsync between Maildirs of one test user: real `doveadm` as the master, and either Dovecot's
//! own `doveadm dsync-server` or our `mailreplica dsync-server` as the slave. Every run writes
//! a raw log (`doveadm -r`), which is decoded with our wire codec into a [`Transcript`]: what
//! each side sent, record by record, with the numbers that legitimately differ between two
//! implementations (modseqs, timestamps of our own actions, cache decisions) masked. Two runs
//! from the same starting point must produce the same transcript: the master then saw the
//! same answers and made the same decisions, whichever slave it talked to.
//!
//! ```text
//!   u.dsync(master_loc, &["backup"], Slave::Ours, "maildir:~/S")
//!     └─ doveadm -c CONF -o mail_location=MASTER backup -r RAW 'mailreplica -c OURS -o mail_location=maildir:~/S'
//!          (doveadm appends `dsync-server` to the command and runs it as the user)
//! ```

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use mailreplica::dsync::wire::{Decoder, Event, KeywordOp, Record};

use super::{MAILREPLICA, Output, TestUser, Tool, View, assert_views_equal, run};

/// Which `dsync-server` a run talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slave {
    /// `doveadm dsync-server` (the oracle).
    Dovecot,
    /// `mailreplica dsync-server` (under test).
    Ours,
}

impl Slave {
    /// The tool that reads this slave's Maildir natively.
    pub fn tool(self) -> Tool {
        match self {
            Self::Dovecot => Tool::Dovecot,
            Self::Ours => Tool::Ours,
        }
    }
}

/// `maildir:~/DIR`: another Maildir of the test user (Maildir++ layout).
pub fn maildir_at(dir: &str) -> String {
    format!("maildir:~/{dir}")
}

/// One finished dsync run.
#[derive(Debug)]
pub struct DsyncRun {
    /// doveadm's exit and output (the slave's stderr is copied into doveadm's).
    pub out: Output,
    /// What went over the wire.
    pub transcript: Transcript,
    /// The raw log, kept for messages.
    pub rawlog: PathBuf,
}

impl DsyncRun {
    /// The state string `-s` printed (first stdout line), if any.
    pub fn state(&self) -> String {
        self.out.text().lines().next().unwrap_or_default().to_owned()
    }

    /// Panics unless doveadm exited with 0 and nobody logged an error or warning.
    #[track_caller]
    pub fn ok(&self) -> &Self {
        assert!(self.out.success(), "dsync failed: {}", self.describe());
        for bad in ["Error:", "Warning:", "Panic:", "Fatal:", "ERROR", "WARN"] {
            assert!(!self.out.stderr.contains(bad), "dsync logged {bad:?}: {}", self.describe());
        }
        self
    }

    /// doveadm's output and where the raw log is, for assertion messages.
    pub fn describe(&self) -> String {
        format!("{}\n(raw log: {})", self.out.describe(), self.rawlog.display())
    }
}

impl TestUser {
    /// The command line doveadm is given as the destination for `slave` on `location`
    /// (doveadm splits it on spaces and appends `dsync-server`).
    pub fn slave_command(&self, slave: Slave, location: &str) -> String {
        assert!(!location.contains(' '), "doveadm splits the slave command on spaces: {location:?}");
        match slave {
            Slave::Dovecot => format!(
                "{} -c {} -o mail_location={location} dsync-server",
                self.doveadm.display(),
                self.dovecot_conf.display()
            ),
            Slave::Ours => format!("{MAILREPLICA} -c {} -o mail_location={location}", self.our_conf.display()),
        }
    }

    /// A directory for raw logs that the user may write to: inside the test's temporary
    /// directory, or, to keep them after the test, under `$MAILREPLICA_TEST_LOGS/<user>/`.
    fn log_dir(&self) -> PathBuf {
        let dir = match std::env::var_os("MAILREPLICA_TEST_LOGS") {
            Some(keep) => PathBuf::from(keep).join(&self.name),
            None => self.tmp.path().join("dsync-logs"),
        };
        if !dir.is_dir() {
            fs::create_dir_all(&dir).expect("mkdir for raw logs");
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod raw log dir");
            self.chown(&dir);
        }
        dir
    }

    /// Runs `doveadm -o mail_location=MASTER ARGS -r RAWLOG SLAVE-COMMAND` as the user (ARGS
    /// starts with the command, `backup` or `sync`, then its options) and decodes the raw log.
    pub fn dsync(&self, master: &str, args: &[&str], slave: Slave, slave_location: &str) -> DsyncRun {
        static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let rawlog = self.log_dir().join(format!("raw{n:03}-{slave:?}.log"));
        let mut all: Vec<String> = vec!["-o".into(), format!("mail_location={master}")];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        all.push("-r".into());
        all.push(rawlog.display().to_string());
        all.push(self.slave_command(slave, slave_location));
        let mut cmd = self.doveadm_cmd(&all);
        if let Ok(level) = std::env::var("MAILREPLICA_LOG") {
            // Our slave inherits doveadm's environment: lets a developer see its debug log.
            cmd.env("MAILREPLICA_LOG", level);
        }
        let out = run(cmd, None);
        let raw = fs::read(&rawlog).unwrap_or_default();
        let transcript = Transcript::from_rawlog(&raw);
        DsyncRun { out, transcript, rawlog }
    }

    /// What Dovecot shows of the Maildir at `location`, checked against what we show of it
    /// (when `also_ours`): the two tools must agree on every Maildir, whoever wrote it.
    #[track_caller]
    pub fn checked_view(&self, location: &str, also_ours: bool) -> View {
        let ours = also_ours.then(|| self.view_at(Tool::Ours, Some(location)));
        let dv = self.view_at(Tool::Dovecot, Some(location));
        if let Some(ours) = ours {
            assert_views_equal(&dv, &ours);
        }
        dv
    }

    /// Compares the replica `ours` with the replica `dovecot` that Dovecot's own slave made
    /// from the same `master` in the same way: mailboxes, subscriptions, mailbox identities,
    /// UIDs, GUIDs, flags, bodies, sizes and dates, as Dovecot reads them.
    ///
    /// Dovecot's slave is the oracle, but not an infallible one: where its replica differs
    /// from its own master (a backup that lost a change) and ours does not, ours is right.
    /// Such places are not failures; they are returned (mailbox names, or "mailbox list" /
    /// "subscriptions"), so that a test states exactly which Dovecot divergences it expects.
    /// Anything else that differs panics.
    #[track_caller]
    pub fn compare_with_oracle(&self, master: &str, dovecot: &str, ours: &str, what: &str) -> Vec<String> {
        let vd = self.view_at(Tool::Dovecot, Some(dovecot));
        let vo = self.view_at(Tool::Dovecot, Some(ours));
        let mut diverged = Vec::new();
        if vd != vo {
            let vm = self.view_at(Tool::Dovecot, Some(master));
            let mut fail = |part: &str, ours_is_master: bool, dovecot_is_master: bool| {
                if ours_is_master && !dovecot_is_master {
                    diverged.push(part.to_owned());
                } else {
                    let mut msg = format!(
                        "{what}: {dovecot} (left, Dovecot's slave) and {ours} (right, ours) differ in {part}, \
                         and ours does not match the master {master} there either:\n"
                    );
                    diff_views(&mut msg, &vd, &vo);
                    panic!("{msg}");
                }
            };
            if vd.mailboxes != vo.mailboxes {
                fail("mailbox list", vo.mailboxes == vm.mailboxes, vd.mailboxes == vm.mailboxes);
            }
            if vd.subscriptions != vo.subscriptions {
                fail("subscriptions", vo.subscriptions == vm.subscriptions, vd.subscriptions == vm.subscriptions);
            }
            let names: std::collections::BTreeSet<&String> = vd.status.keys().chain(vo.status.keys()).collect();
            for n in names {
                let of = |v: &View| (v.status.get(n).cloned(), v.mails.get(n).cloned());
                if of(&vd) != of(&vo) {
                    fail(n, of(&vo) == of(&vm), of(&vd) == of(&vm));
                }
            }
            if !diverged.is_empty() {
                eprintln!("{what}: Dovecot's own slave diverged from its master in {diverged:?}; ours did not");
            }
        }
        let fields = "uid size.physical size.virtual date.received";
        for mb in vo.status.keys() {
            // Bytes are compared with Dovecot's replica, or with the master where that diverged.
            let reference = if diverged.contains(mb) { master } else { dovecot };
            let args = ["-f", "tab", "fetch", fields, "mailbox", mb.as_str(), "all"];
            let x = self.ok_at(Tool::Dovecot, Some(reference), &args);
            let y = self.ok_at(Tool::Dovecot, Some(ours), &args);
            assert_eq!(x, y, "{what}: {mb}: sizes/dates differ ({reference} left, {ours} right)");
            for [uid, _, _] in vo.mails_of(mb) {
                let x = self.body_at(Tool::Dovecot, Some(reference), mb, uid);
                let y = self.body_at(Tool::Dovecot, Some(ours), mb, uid);
                assert!(x == y, "{what}: {mb} UID {uid}: bodies differ ({} vs {} bytes)", x.len(), y.len());
            }
        }
        diverged
    }

    /// Writes a mail straight into `new/` of `mailbox` in the Maildir++ directory `root`
    /// under the base name `base` (which becomes its GUID), as a delivery agent would: the
    /// same call on two Maildirs gives both the same mail with the same GUID.
    pub fn deliver(&self, root: &Path, mailbox: &str, base: &str, body: &[u8]) {
        let dir = if mailbox == "INBOX" { root.to_path_buf() } else { root.join(format!(".{mailbox}")) };
        assert!(dir.join("new").is_dir(), "no mailbox {mailbox} in {}", root.display());
        let tmp = dir.join("tmp").join(base);
        self.write_file(&tmp, body);
        fs::rename(&tmp, dir.join("new").join(base)).expect("rename into new/");
    }
}

fn diff_views(msg: &mut String, a: &View, b: &View) {
    if a.mailboxes != b.mailboxes {
        let _ = writeln!(msg, "mailbox list: {:?}\n          vs {:?}", a.mailboxes, b.mailboxes);
    }
    if a.subscriptions != b.subscriptions {
        let _ = writeln!(msg, "subscriptions: {:?}\n           vs {:?}", a.subscriptions, b.subscriptions);
    }
    let names: std::collections::BTreeSet<&String> = a.status.keys().chain(b.status.keys()).collect();
    for n in names {
        let (x, y) = (a.status.get(n), b.status.get(n));
        if x != y {
            let _ = writeln!(msg, "status of {n} [messages uidnext uidvalidity unseen guid]: {x:?} vs {y:?}");
        }
        let (x, y) = (a.mails.get(n), b.mails.get(n));
        if x != y {
            let _ = writeln!(msg, "mails of {n} [uid guid flags]:\n  {x:?}\n  vs {y:?}");
        }
    }
}

// ------------------------------------------------------------------------------------------
// Transcripts

/// What each side of a dsync session sent, one normalized line per record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Transcript {
    /// Records the master (doveadm) sent.
    pub master: Vec<String>,
    /// Records the slave sent.
    pub slave: Vec<String>,
}

impl Transcript {
    /// Decodes a doveadm raw log (`-r`): `O` lines are what the master sent, `I` lines what it
    /// received.
    pub fn from_rawlog(raw: &[u8]) -> Self {
        let (sent, received) = split_rawlog(raw);
        Self { master: summarize_stream(&sent), slave: summarize_stream(&received) }
    }

    /// Every line of both directions, prefixed with who sent it.
    pub fn lines(&self) -> Vec<String> {
        let m = self.master.iter().map(|l| format!("M> {l}"));
        m.chain(self.slave.iter().map(|l| format!("S> {l}"))).collect()
    }

    /// The session as two slaves must agree on it, put next to the session `other` (see
    /// [`canonical_pair`]).
    fn parts(&self) -> Parts {
        let (m_pre, m_boxes, m_tail) = sections(&self.master, ".");
        let (s_pre, s_boxes, s_tail) = sections(&self.slave, "F ");
        let mut boxes: Vec<(String, Vec<String>)> = Vec::new();
        for (i, m) in m_boxes.iter().enumerate() {
            let guid = m[0].split(' ').nth(1).unwrap_or_default().to_owned();
            let mut lines: Vec<String> = m.iter().map(|l| format!("M> {l}")).collect();
            lines.extend(s_boxes.get(i).into_iter().flatten().map(|l| format!("S> {l}")));
            boxes.push((guid, lines));
        }
        // The slave answers every `B`; extra sections mean it answered what was not asked.
        let mut tail: Vec<String> =
            s_boxes.iter().skip(m_boxes.len()).flatten().map(|l| format!("S> (unasked) {l}")).collect();
        tail.extend(m_tail.iter().map(|l| format!("M> {l}")));
        tail.extend(s_tail.iter().map(|l| format!("S> {l}")));
        let mut pre: Vec<String> = m_pre
            .iter()
            .map(|l| match l.strip_prefix("S ") {
                // The saved states the master starts from (see `canonical_pair`).
                Some(rest) => format!("M> S {} (state)", rest.split(' ').take(2).collect::<Vec<_>>().join(" ")),
                None => format!("M> {l}"),
            })
            .collect();
        pre.extend(s_pre.iter().map(|l| format!("S> {l}")));
        Parts { pre, boxes, tail }
    }

    /// Lines of the master's side that start with `prefix`.
    pub fn master_records(&self, prefix: &str) -> Vec<&str> {
        self.master.iter().filter(|l| l.starts_with(prefix)).map(String::as_str).collect()
    }

    /// Lines of the slave's side that start with `prefix`.
    pub fn slave_records(&self, prefix: &str) -> Vec<&str> {
        self.slave.iter().filter(|l| l.starts_with(prefix)).map(String::as_str).collect()
    }
}

/// Splits one direction into what comes before the first mailbox (up to the `D` record),
/// one section per `B` record, and the tail: the last line if it starts with `tail_prefix`
/// (the master's end of the mailbox list, the slave's `F`).
fn sections(lines: &[String], tail_prefix: &str) -> (Vec<String>, Vec<Vec<String>>, Vec<String>) {
    let mut lines = lines.to_vec();
    let mut tail = Vec::new();
    if lines.last().is_some_and(|l| l.starts_with(tail_prefix)) {
        tail.extend(lines.pop());
    }
    let start = lines.iter().position(|l| l.starts_with("D ")).map_or(lines.len(), |p| p + 1);
    let pre = lines[..start].to_vec();
    let mut boxes: Vec<Vec<String>> = Vec::new();
    for l in &lines[start..] {
        match boxes.last_mut() {
            Some(b) if !l.starts_with("B ") => b.push(l.clone()),
            _ => boxes.push(vec![l.clone()]),
        }
    }
    (pre, boxes, tail)
}

/// A session cut into what comes before the mailboxes, one part per mailbox (by GUID, in the
/// master's order: its `B` and everything both sides sent about it) and the end.
struct Parts {
    pre: Vec<String>,
    boxes: Vec<(String, Vec<String>)>,
    tail: Vec<String>,
}

/// A mailbox part in which no mail was requested or sent and the slave did not lose it.
fn quiet(lines: &[String]) -> bool {
    let moved = |l: &String| ["M> R ", "M> M ", "S> R ", "S> M "].iter().any(|p| l.starts_with(p));
    let kept = |l: &String| l.starts_with("S> B ") && l.contains(" lost=false ignore=false");
    lines.is_empty() || (!lines.iter().any(moved) && lines.iter().any(kept))
}

/// A mailbox part with nothing but the two `B` records: the master skipped the mailbox.
fn skipped(lines: &[String]) -> bool {
    lines.len() <= 2
}

/// Two sessions, each as the slaves must agree on it: what each side sent before the
/// mailboxes (handshake, states, tree), then mailbox by mailbox (in the master's order) what
/// each side sent about it, then the slave's finish.
///
/// One difference is not a difference in decisions: a mailbox that the master skipped with
/// one slave (or left out entirely, in a state sync) and synced with the other without a
/// single mail request or body either way. Dovecot's own slave leaves its HIGHESTMODSEQ above
/// the master's after an import, so the master re-syncs such mailboxes on every later run
/// (re-sending every save and known expunge, to no effect), while ours ends at the master's
/// and is skipped. Such mailboxes are shown as "quiet" in both; what the changes did is
/// checked by comparing the replicas' contents, not here. Where the master skipped a mailbox
/// in a run without a saved state it keeps no state for it (last common UID 0), and where it
/// synced it, it does: the saved states it starts the next run from are shown by mailbox and
/// UIDVALIDITY only.
pub fn canonical_pair(a: &Transcript, b: &Transcript) -> (Vec<String>, Vec<String>) {
    let (pa, pb) = (a.parts(), b.parts());
    let mut guids: Vec<&String> = pa.boxes.iter().map(|(g, _)| g).collect();
    for (g, _) in &pb.boxes {
        if !guids.contains(&g) {
            guids.push(g);
        }
    }
    let get = |p: &Parts, g: &str| -> Vec<String> {
        p.boxes.iter().find(|(x, _)| x == g).map(|(_, l)| l.clone()).unwrap_or_default()
    };
    let (mut oa, mut ob) = (pa.pre.clone(), pb.pre.clone());
    for g in guids {
        let (la, lb) = (get(&pa, g), get(&pb, g));
        if quiet(&la) && quiet(&lb) && (skipped(&la) || skipped(&lb)) {
            for o in [&mut oa, &mut ob] {
                o.push(format!("   B {g}: quiet (skipped, or no mail requested or sent)"));
            }
        } else {
            let missing = || vec![format!("   B {g}: not sent")];
            oa.extend(if la.is_empty() { missing() } else { la });
            ob.extend(if lb.is_empty() { missing() } else { lb });
        }
    }
    oa.extend(pa.tail.iter().cloned());
    ob.extend(pb.tail.iter().cloned());
    (oa, ob)
}

/// Panics with both sessions side by side unless they are the same in their
/// [`canonical_pair`] form.
#[track_caller]
pub fn assert_same_transcripts(dovecot: &DsyncRun, ours: &DsyncRun, what: &str) {
    let (a, b) = canonical_pair(&dovecot.transcript, &ours.transcript);
    if a == b {
        return;
    }
    let mut msg = format!(
        "{what}: the master saw different sessions with Dovecot's slave (left, {}) and ours (right, {}):\n",
        dovecot.rawlog.display(),
        ours.rawlog.display()
    );
    let first_diff = a.iter().zip(&b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()));
    let from = first_diff.saturating_sub(5);
    for i in from..a.len().max(b.len()).min(first_diff + 40) {
        let x = a.get(i).map_or("", String::as_str);
        let y = b.get(i).map_or("", String::as_str);
        let mark = if x == y { ' ' } else { '!' };
        let _ = writeln!(msg, "{mark} {x:<90} | {y}");
    }
    let _ = writeln!(msg, "--- Dovecot's run ---\n{}\n--- our run ---\n{}", dovecot.out.stderr, ours.out.stderr);
    panic!("{msg}");
}

/// Splits a raw log into (sent, received) bytes: exactly what the master wrote to its slave,
/// and what it read from it. Each entry is `<sec>.<usec> <I|O><:|>> ` followed by data: `:`
/// entries run to their LF (included), `>` entries are partial lines that run to the next
/// entry.
pub fn split_rawlog(raw: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let (mut sent, mut received) = (Vec::new(), Vec::new());
    let mut pos = 0;
    while pos < raw.len() {
        let Some((input, whole_line, len)) = entry_prefix(&raw[pos..]) else {
            panic!(
                "unparsable raw log at byte {pos}: {:?}",
                String::from_utf8_lossy(&raw[pos..(pos + 80).min(raw.len())])
            );
        };
        let start = pos + len;
        let end = if whole_line {
            raw[start..].iter().position(|&b| b == b'\n').map_or(raw.len(), |p| start + p + 1)
        } else {
            // Up to the next entry: a LF-free partial line ends where a prefix starts.
            let mut e = start;
            while e < raw.len() && entry_prefix(&raw[e..]).is_none() {
                e += 1;
            }
            e
        };
        let dst = if input { &mut received } else { &mut sent };
        dst.extend_from_slice(&raw[start..end]);
        pos = end;
    }
    (sent, received)
}

fn entry_prefix(s: &[u8]) -> Option<(bool, bool, usize)> {
    let secs = s.iter().take_while(|b| b.is_ascii_digit()).count();
    let rest = s.get(secs..)?.strip_prefix(b".")?;
    let usecs = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if secs == 0 || usecs != 6 {
        return None;
    }
    match rest.get(usecs..usecs + 4)? {
        [b' ', dir @ (b'I' | b'O'), kind @ (b':' | b'>'), b' '] => {
            Some((*dir == b'I', *kind == b':', secs + usecs + 5))
        }
        _ => None,
    }
}

/// FNV-1a, enough to tell bodies apart in a transcript.
fn fnv(h: u64, data: &[u8]) -> u64 {
    data.iter().fold(h, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

fn text(t: &mailreplica::dsync::wire::Text) -> String {
    String::from_utf8_lossy(t.as_bytes()).into_owned()
}

fn opt(t: &Option<mailreplica::dsync::wire::Text>) -> String {
    t.as_ref().map_or_else(|| "-".to_owned(), text)
}

/// A time only as "set" or "unset": the slaves act at different moments.
fn when(t: i64) -> &'static str {
    if t == 0 { "0" } else { "t" }
}

/// Decodes one direction and turns each record into a normalized line. Lists whose order is
/// unspecified (mailbox tree nodes, mail requests) are sorted within each list.
fn summarize_stream(bytes: &[u8]) -> Vec<String> {
    let mut dec = Decoder::new();
    dec.feed(bytes);
    dec.feed_eof();
    let mut out: Vec<String> = Vec::new();
    let mut body: Option<(usize, u64)> = None;
    loop {
        let ev = match dec.next() {
            Ok(Some(ev)) => ev,
            Ok(None) => break,
            Err(e) => {
                out.push(format!("<undecodable: {e}>"));
                break;
            }
        };
        match ev {
            Event::Greeting { minor } => out.push(format!("VERSION 3.{minor}")),
            Event::Record(r) => out.push(summarize_record(&r)),
            Event::EndOfList => out.push(".".into()),
            Event::Done => out.push("X".into()),
            Event::BodyChunk(c) => {
                let (n, h) = body.get_or_insert((0, 0xcbf2_9ce4_8422_2325));
                *n += c.len();
                *h = fnv(*h, c.declassify());
            }
            Event::BodyEnd => {
                let (n, h) = body.take().unwrap_or((0, 0));
                if let Some(last) = out.last_mut() {
                    let _ = write!(last, " body={n}:{h:016x}");
                }
            }
        }
    }
    // A slave closes with `F` then `X`; whether the master logged the `X` before it closed
    // its raw log is a matter of timing.
    if out.len() >= 2 && out[out.len() - 1] == "X" && out[out.len() - 2].starts_with("F ") {
        out.pop();
    }
    sort_unordered_runs(&mut out);
    out
}

fn sort_unordered_runs(lines: &mut [String]) {
    let mut i = 0;
    while i < lines.len() {
        let kind = lines[i].split(' ').next().unwrap_or_default().to_owned();
        let mut j = i;
        while j < lines.len() && lines[j].split(' ').next() == Some(kind.as_str()) {
            j += 1;
        }
        if kind == "N" || kind == "R" {
            lines[i..j].sort();
        }
        i = j.max(i + 1);
    }
}

fn summarize_record(r: &Record) -> String {
    match r {
        // Hostnames and the (fixed) handshake flags of either side say nothing about decisions.
        Record::Handshake(h) => format!(
            "H type={:?} backup_send={} backup_recv={} box={} excludes={:?}",
            h.sync_type,
            h.backup_send,
            h.backup_recv,
            opt(&h.sync_box),
            h.exclude_mailboxes.as_ref().map(|v| v.iter().map(text).collect::<Vec<_>>())
        ),
        Record::MailboxState(s) => format!(
            "S {} uidvalidity={} last_common_uid={} messages={} changes_during_sync={}",
            s.mailbox_guid, s.last_uidvalidity, s.last_common_uid, s.last_messages_count, s.changes_during_sync
        ),
        Record::MailboxNode(n) => format!(
            "N {} {:?} guid={} uidvalidity={} uidnext={} renamed={} subscribed={} subchange={}",
            n.name.components().iter().map(text).collect::<Vec<_>>().join("/"),
            n.existence,
            n.mailbox_guid.map_or_else(|| "-".to_owned(), |g| g.to_string()),
            n.uid_validity,
            n.uid_next,
            when(n.last_renamed_or_created),
            n.subscribed,
            when(n.last_subscription_change)
        ),
        Record::MailboxDeletes(d) => {
            let list = |v: &[mailreplica::dsync::wire::Deletion]| {
                let mut g: Vec<String> = v.iter().map(|d| d.guid.to_string()).collect();
                g.sort();
                g.join(",")
            };
            format!(
                "D sep={:?} escape={:?} mailboxes=[{}] dirs=[{}] unsubscribes=[{}]",
                d.hierarchy_sep.get() as char,
                d.escape_char.map(|c| c.get() as char),
                list(&d.mailboxes),
                list(&d.dirs),
                list(&d.unsubscribes)
            )
        }
        // Modseqs are each side's own numbering; cache decisions an index optimisation.
        Record::Mailbox(b) => format!(
            "B {} uidvalidity={} uidnext={} messages={} first_recent_uid={} lost={} ignore={} guids={}/{}/{}",
            b.mailbox_guid,
            b.uid_validity,
            b.uid_next,
            b.messages_count,
            b.first_recent_uid,
            b.mailbox_lost,
            b.mailbox_ignore,
            b.have_guids,
            b.have_save_guids,
            b.have_only_guid128
        ),
        Record::Attribute(a) => format!("A {:?} {}", a.attr_type, text(&a.key)),
        // A save carries, besides the final flags, whatever flag changes the sender's log
        // still holds for that mail; how far back a log reaches is each side's own history
        // (ours starts where our index started), so saves are compared by final state only.
        Record::MailChange(c) if c.change_type == mailreplica::dsync::wire::ChangeType::Save => {
            let mut kws: Vec<String> = c
                .keyword_changes
                .iter()
                .filter(|k| matches!(k.op, KeywordOp::Final | KeywordOp::AddAndFinal))
                .map(|k| text(&k.keyword))
                .collect();
            kws.sort();
            format!(
                "C Save uid={} guid={} final={:02x} keywords={kws:?} received={} vsize={:x}",
                c.uid,
                opt(&c.guid),
                c.final_flags.bits(),
                c.received_timestamp,
                c.virtual_size
            )
        }
        Record::MailChange(c) => format!(
            "C {:?} uid={} guid={} add={:02x} remove={:02x} final={:02x} kw={:?} received={} vsize={:x}",
            c.change_type,
            c.uid,
            opt(&c.guid),
            c.add_flags.bits(),
            c.remove_flags.bits(),
            c.final_flags.bits(),
            c.keyword_changes.iter().map(|k| format!("{:?}{}", k.op, text(&k.keyword))).collect::<Vec<_>>(),
            c.received_timestamp,
            c.virtual_size
        ),
        Record::MailRequest(r) => format!("R guid={} uid={}", opt(&r.guid), r.uid),
        Record::Mail(m) => format!(
            "M guid={} uid={} pop3={}/{} received={} saved={} stream={}",
            opt(&m.guid),
            m.uid,
            opt(&m.pop3_uidl),
            m.pop3_order,
            m.received_date,
            when(m.saved_date),
            m.stream
        ),
        Record::Finish(f) => {
            format!(
                "F error={} mail_error={} require_full_resync={}",
                opt(&f.error),
                f.mail_error,
                f.require_full_resync
            )
        }
    }
}

#!/usr/bin/env python3
"""Replication latency of `mailreplica replicator`: from a delivery on the source to the mail
being on the replica, at a given rate of deliveries spread over many users; a no-change full
pass over every user against a cron loop of `doveadm sync -f` and against Dovecot 2.3's own
replicator; and (RSS_USERS=N) the replicator's memory with N users known.

    sudo tests/bench/replicator.py                    1,000 users; 1/s then 50/s, 30 s each
    sudo USERS=100 RATES=1,10 SECONDS=20 tests/bench/replicator.py
    sudo PASSES=3 RSS_USERS=10000 tests/bench/replicator.py      what BENCHMARKS.md reports
    sudo USERS=20 RATES= CRON=0 DOVECOT_REPLICATOR=0 RSS_USERS=10000 tests/bench/replicator.py
                                                      the memory phase alone (20 users first)

The whole stack is real and on this host: Dovecot 2.3 (its `dovecot-lda` delivers, its
`replication` plugin notifies the replicator through the FIFO), `mailreplica replicator`
(PARALLEL syncs at once, default 8), one SSH connection to OpenSSH's sshd on 127.0.0.1, whose
root key forces `mailreplica-wrapper`, which drops to the user and writes ~/Maildir.

Phases, in this order:

* Latency (RATES, comma-separated deliveries per second; empty: skipped). A delivery's latency
  is the time from `dovecot-lda` returning (the mail is on the source) to the mail's file being
  in the user's replica (`new/` or `cur/` of ~/Maildir, polled every 10 ms). Deliveries are
  started at the rate asked for, each to a random user, by a pool of threads, so that a slow
  delivery does not slow the schedule. Reported per rate: deliveries, p50, p99 and max latency.
* Full pass, ours (PASSES times): `mailreplica replicate --full -p low '*'` until every user's
  full sync started after the request and ended well, nothing running; also how long the
  request itself took to be answered.
* Cron loop (CRON=1, the default; once): `doveadm sync -f -u USER remoteprefix:…` per user
  (Dovecot 2.3's master, one ssh per user, PARALLEL at once, into the same replicas); the
  replicator sits still meanwhile (SIGSTOP). Then the replicator's peak RSS (VmHWM) over the
  run so far, and the replicator is stopped (SIGTERM).
* Dovecot 2.3's own replicator (DOVECOT_REPLICATOR=1, the default): a second Dovecot instance
  with its own base_dir and state_dir under the work directory (never /etc/dovecot), the same
  users from a passwd-file, `service replicator` (process_min_avail = 1, replicator-doveadm
  0600), its aggregator, `doveadm-server` (0600), `mail_replica = remoteprefix:root@127.0.0.1`,
  `dsync_remote_cmd` the same ssh into the same sshd, wrapper and replicas, and
  `replication_max_conns = PARALLEL`. Three measurements:
    - startup: from starting Dovecot (no replicator.db) until its replicator has synced every
      user it listed from the userdb (2.3 does that at once, with -f and no state);
    - `doveadm replicator replicate -f -p low '*'` (PASSES times). Dovecot 2.3 does not send -f
      for that (it only moves last_full_sync; REPLICATOR.md §2.6): these syncs are incremental,
      from the states the startup pass saved;
    - the same request after a restart (the states kept in replicator.db) with
      `replication_dsync_parameters = -d -N -l 30 -U -f` (PASSES times): every sync is -f, as
      ours: the like-for-like figure.
  Done means as for ours: every user's last full sync at or after the request, a success after
  it, nothing running (polled over the replicator-doveadm socket, which both replicators serve,
  every 50 ms for both). A failed user ends the phase with the tail of Dovecot's log.
* Memory (RSS_USERS=N, default 0: skipped): a second `mailreplica replicator` whose userdb is a
  passwd-file of N cheap virtual users (one unused uid, no Unix accounts; a home directory each
  under the work directory; the wrapper's second peer reads the same passwd-file), every user
  of it replicated, into the same sshd. Reported: its VmHWM once it has listed and queued them
  all (its first syncs already running); after the first sync of all N (the peak of the whole
  first pass, watched through the `STATUS` overview once a second); after a restart from the
  saved records with nothing due (N users known, idle); after a no-change `replicate --full
  '*'` over the N users (timed, watched the same way; the request goes over the socket, since
  `mailreplica replicate` gives up after 30 s and at 10,000 users the answer comes later);
  after 200 `STATUS '*'` one after the
  other; and after that pass once more, watched as the 1,000-user passes are (`STATUS '*'` and
  `STATUS-DSYNC` every 50 ms: a busy monitor).

The binaries are copied into the work directory first, so that a rebuild during the run does
not change them mid-way (their mtime and sha256 are printed). The load average and the number
of compiler processes running are printed at each phase, since another build on the host skews
every figure.

Needs root (throw-away users, removed at exit), Dovecot 2.3, sshd, ssh-keygen; the workspace
built first (cargo build --release --workspace). Works in /run/mrrep.*; KEEP=1 keeps it. Every
process it started (sshd, both Dovecot instances and their children, the replicators) is
stopped at exit, failure or not.
"""

import collections
import concurrent.futures
import grp
import hashlib
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

USERS = int(os.environ.get("USERS", "1000"))
RATES = [float(r) for r in os.environ.get("RATES", "1,50").split(",") if r.strip()]
SECONDS = float(os.environ.get("SECONDS", "30"))
PARALLEL = int(os.environ.get("PARALLEL", "8"))
PASSES = int(os.environ.get("PASSES", "1"))
CRON = os.environ.get("CRON", "1") == "1"
DOVECOT_REPLICATOR = os.environ.get("DOVECOT_REPLICATOR", "1") == "1"
RSS_USERS = int(os.environ.get("RSS_USERS", "0"))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MR = os.environ.get("MAILREPLICA", f"{ROOT}/target/release/mailreplica")
WRAPPER = os.environ.get("WRAPPER", f"{ROOT}/target/release/mailreplica-wrapper")
DOVECOT_FULL_PARAMS = "-d -N -l 30 -U -f"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def run(*cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def load():
    """The load average, and how many compilers run beside us (another build skews everything)."""
    builds = 0
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/comm") as f:
                builds += f.read().strip() in ("rustc", "cc1", "cc1plus", "ld", "cargo")
        except OSError:
            pass
    return "load %.2f %.2f %.2f, %d compiler processes" % (os.getloadavg() + (builds,))


class Cleanup:
    """What to undo at exit: processes (stopped in reverse order), process groups of Dovecot
    instances (their children too), users."""

    def __init__(self, work):
        self.work = work
        self.procs, self.groups, self.users = [], [], []

    def run(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.send_signal(signal.SIGCONT)  # a replicator left stopped by SIGSTOP
                except ProcessLookupError:
                    pass
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for pgid in self.groups:
            stop_group(pgid)
        # Anything else still in the work directory (an ssh of a doveadm-server, a Dovecot child
        # that left its group): only processes whose command line or cwd is in our own
        # directory.
        for pid in leftovers(self.work):
            log(f"killing leftover process {pid}: {cmdline(pid)}")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for u in self.users:
            subprocess.run(["userdel", u], stderr=subprocess.DEVNULL)


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def leftovers(work):
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        pid = int(d)
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            cwd = ""
        if cwd == work or cwd.startswith(work + "/") or work + "/" in cmdline(pid):
            found.append(pid)
    return found


def stop_group(pgid, timeout=30):
    """SIGTERM to a process group (a Dovecot master started in a session of its own, and its
    children), then SIGKILL to whatever is left of it after `timeout`."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    until = time.time() + timeout
    while time.time() < until:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main():
    global MR, WRAPPER
    if os.geteuid() != 0:
        sys.exit("replicator.py: run as root (it creates throw-away users)")
    for f in (MR, WRAPPER):
        if not os.path.exists(f):
            sys.exit(f"replicator.py: {f} is missing: cargo build --release --workspace")
    work = tempfile.mkdtemp(prefix="mrrep.", dir="/run")
    os.chmod(work, 0o755)
    prefix = f"mrb{os.getpid()}x"
    cleanup = Cleanup(work)
    try:
        # A snapshot of the binaries: a rebuild meanwhile does not change what is measured.
        os.mkdir(f"{work}/bin", 0o755)
        for src in (MR, WRAPPER):
            dst = f"{work}/bin/{os.path.basename(src)}"
            shutil.copy2(src, dst)
            os.chmod(dst, 0o755)
            with open(dst, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()[:12]
            mtime = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.stat(src).st_mtime))
            print(f"binary {src}: built {mtime}, sha256 {digest}")
        MR, WRAPPER = f"{work}/bin/mailreplica", f"{work}/bin/{os.path.basename(WRAPPER)}"
        bench(work, prefix, cleanup)
    finally:
        cleanup.run()
        if os.environ.get("KEEP"):
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, cond, timeout, interval=0.05):
    until = time.time() + timeout
    while not cond():
        if time.time() > until:
            sys.exit(f"replicator.py: timed out waiting for {what}")
        time.sleep(interval)


# The replicator-doveadm protocol, which Dovecot 2.3's replicator and ours both serve: the same
# client and the same polling for both.

def rep_query(path, request, timeout=60, one_line=False):
    """The reply to one request: its lines up to the empty line that ends it (`one_line`: its
    first line, for REPLICATE)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(b"VERSION\treplicator-doveadm-client\t1\t0\n" + request.encode() + b"\n")
        buf = b""
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                raise ConnectionError(f"{path}: closed before the end of the reply to {request!r}")
            buf += chunk
            lines = buf.split(b"\n")  # [0]: the server's VERSION line; [-1]: an unfinished line
            if one_line and len(lines) > 2:
                return [lines[1].decode()]
            if b"" in lines[1:-1]:
                return [l.decode() for l in lines[1:lines.index(b"", 1)]]


def rep_users(path):
    """`STATUS *`: user -> (priority, last fast sync, last full sync, failed, last success)."""
    rows = {}
    for line in rep_query(path, "STATUS\t*"):
        f = line.split("\t")
        rows[f[0]] = (f[1], int(f[2]), int(f[3]), f[4] == "1", int(f[5]))
    return rows


def rep_running(path):
    """`STATUS-DSYNC`: (user, kind) of each running sync (Dovecot lists idle slots as `\\t-`)."""
    return [tuple(l.split("\t")[:2]) for l in rep_query(path, "STATUS-DSYNC") if not l.startswith("\t")]


def rep_overview(path):
    return {k: int(v) for k, v in (l.split("\t") for l in rep_query(path, "STATUS"))}


class PassFailed(Exception):
    pass


def wait_pass(path, users, since, timeout, kinds=None, failed_log=None):
    """Until every one of `users` had a sync start at or after `since` that was a full one (its
    last full sync) and ended well, nothing queued for them and nothing running. `kinds` gets
    the kind of each running sync seen. A failed user or the timeout raises PassFailed."""
    until = time.time() + timeout
    want = set(users)
    while True:
        running = rep_running(path)
        if kinds is not None:
            for u, k in running:
                kinds[u] = k
        rows = rep_users(path)
        failed = sorted(u for u, r in rows.items() if r[3] and u in want)
        if failed:
            raise PassFailed(f"{len(failed)} users failed (first: {failed[0]})" + (failed_log() if failed_log else ""))
        if not running and want <= rows.keys() and all(
                rows[u][0] == "none" and rows[u][2] >= since and rows[u][4] >= rows[u][2] for u in want):
            return
        if time.time() > until:
            missing = sum(1 for u in want if u not in rows or rows[u][2] < since or rows[u][4] < rows[u][2])
            raise PassFailed(f"timed out: {missing} users not synced yet, {len(running)} syncs running"
                             + (failed_log() if failed_log else ""))
        time.sleep(0.05)


def triggered_pass(trigger, path, users, failed_log=None):
    """Seconds from `trigger` (a command line asking for a full sync of every user, or a
    function doing it) until [`wait_pass`]; the kinds of sync seen running; and the seconds the
    request itself took to be answered."""
    wait_idle(path)
    time.sleep(2)
    since = int(time.time()) + 1
    time.sleep(since - time.time())
    t0 = time.time()
    if callable(trigger):
        trigger()
    else:
        r = subprocess.run(trigger, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            raise PassFailed(f"{' '.join(trigger)} exited {r.returncode} after {time.time() - t0:.1f} s: "
                             f"{r.stderr.strip()}" + (failed_log() if failed_log else ""))
    answered = time.time() - t0
    kinds = {}
    wait_pass(path, users, since, 3600, kinds, failed_log)
    return time.time() - t0, collections.Counter(kinds.values()), answered


def wait_idle(path, timeout=600):
    until = time.time() + timeout
    while rep_running(path) or any(r[0] != "none" for r in rep_users(path).values()):
        if time.time() > until:
            raise PassFailed("the replicator never became idle")
        time.sleep(0.05)


def mem(pid):
    """VmHWM and VmRSS of `pid`, in MiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS"):
                out[k] = int(v.split()[0]) / 1024
    return out


def tail(path, n=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError as e:
        return f"({path}: {e})\n"


def free_id():
    """An id that is neither a uid nor a gid on this host (for the memory phase's users)."""
    for i in range(2_900_000, 3_000_000):
        try:
            pwd.getpwuid(i)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(i)
            continue
        except KeyError:
            return i
    sys.exit("replicator.py: no free uid in 2900000..3000000")


def bench(work, prefix, cleanup):
    procs, groups = cleanup.procs, cleanup.groups
    log(f"creating {USERS} users ({load()})")
    homes = {}
    users = cleanup.users
    os.makedirs(f"{work}/home")
    for i in range(USERS):
        name = f"{prefix}{i}"
        home = f"{work}/home/{name}"
        run("useradd", "-M", "-U", "-d", home, "-s", "/usr/sbin/nologin", name)
        users.append(name)
        os.mkdir(home)
        shutil.chown(home, name, name)
        homes[name] = home
    # The memory phase's users: virtual, in a passwd-file, all with one unused uid.
    rss_id = free_id() if RSS_USERS else None
    rss_passwd = f"{work}/etc/users-rss"
    # The replica side: the wrapper's policy, sshd forcing it.
    os.makedirs(f"{work}/etc", mode=0o755)
    policy = f"{work}/etc/wrapper.toml"
    with open(policy, "w") as f:
        f.write("[peer.mx1]\nallow_users = [%s]\nfirst_valid_uid = 1000\nlast_valid_uid = 4000000000\n"
                'mail_location = "maildir:~/Maildir"\n' % ", ".join(f'"{u}"' for u in users))
        if RSS_USERS:
            f.write(f'\n[peer.rss]\nallow_all_users_in_uid_range = true\nfirst_valid_uid = {rss_id}\n'
                    f'last_valid_uid = {rss_id}\nuserdb = "passwd-file:{rss_passwd}"\n'
                    'mail_location = "maildir:~/Maildir"\n')
    os.chmod(policy, 0o644)
    ssh = f"{work}/ssh"
    os.mkdir(ssh, 0o700)
    for k in ("host", "client", "client-rss"):
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{ssh}/{k}")
    ak = f"{ssh}/authorized_keys"
    with open(ak, "w") as f:
        for key, peer in (("client", "mx1"), ("client-rss", "rss")):
            pub = open(f"{ssh}/{key}.pub").read().strip()
            f.write(f'restrict,command="{WRAPPER} --peer {peer} --policy {policy} --auth-log {work}/auth.log" {pub}\n')
    os.chmod(ak, 0o600)
    port = free_port()
    with open(f"{ssh}/sshd_config", "w") as f:
        f.write(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {ssh}/host\nPidFile none\nAuthorizedKeysFile {ak}\n"
                "UsePAM no\nPermitRootLogin forced-commands-only\nPasswordAuthentication no\nMaxSessions 100\n"
                "MaxStartups 100\nLogLevel ERROR\n")
    os.makedirs("/run/sshd", exist_ok=True)
    # sshd runs each forced command through root's shell, which reads /root/.bashrc: where that
    # does real work (this project's machine runs `pyenv init`), it would land on every session
    # of both stacks. As tests/bench/many_users.sh: an empty one in sshd's private mount
    # namespace (MASK_ROOT_BASHRC=0 keeps the host's).
    sshd = ["/usr/sbin/sshd", "-D", "-e", "-f", f"{ssh}/sshd_config"]
    if os.environ.get("MASK_ROOT_BASHRC", "1") == "1" and os.path.exists("/root/.bashrc"):
        sshd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                'mount --bind /dev/null /root/.bashrc && exec "$@"', "sh"] + sshd
    procs.append(subprocess.Popen(sshd,
                                  stdin=subprocess.DEVNULL, stdout=open(f"{work}/sshd.log", "w"),
                                  stderr=subprocess.STDOUT))
    with open(f"{ssh}/known_hosts", "w") as f:
        f.write(f"[127.0.0.1]:{port} {open(ssh + '/host.pub').read().strip()}\n")
    remote_cmd = (f"ssh -F /dev/null -i {ssh}/client -o IdentitiesOnly=yes -o BatchMode=yes "
                  f"-o StrictHostKeyChecking=yes -o UserKnownHostsFile={ssh}/known_hosts -p {port} "
                  "-l%{login} %{host} doveadm dsync-server -u%u -U")
    # The source: Dovecot with its replication plugin; the aggregator's listeners are ours.
    dv = f"{work}/dovecot"
    os.makedirs(f"{dv}/state")
    conf = f"{dv}/dovecot.conf"
    with open(conf, "w") as f:
        f.write(dovecot_conf(dv, f"{dv}/dovecot.log", "driver = passwd", remote_cmd, "remoteprefix:replica")
                + f"""service aggregator {{
  fifo_listener replication-notify-fifo {{
    mode = 0
  }}
  unix_listener replication-notify {{
    mode = 0
  }}
}}
""")
    p = subprocess.Popen(["/usr/sbin/dovecot", "-F", "-c", conf], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    procs.append(p)
    groups.append(p.pid)
    wait_for("dovecot", lambda: os.path.exists(f"{dv}/run/auth-userdb"), 20)
    cfg = f"{work}/mailreplica.toml"
    admin = f"{work}/admin"
    with open(cfg, "w") as f:
        f.write(f"""mail_location = "maildir:~/Source"
first_valid_uid = 1000
ssh_key = "{ssh}/client"
ssh_known_hosts = "{ssh}/known_hosts"

[replicator]
destination = "remoteprefix:root@127.0.0.1:{port}"
state_dir = "{work}/state"
admin_socket = "{admin}"
plugin_fifo = "{dv}/run/replication-notify-fifo"
users = [{", ".join(f'"{u}"' for u in users)}]
max_parallel = {PARALLEL}
""")
    service = subprocess.Popen([MR, "-c", cfg, "replicator"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=open(f"{work}/replicator.log", "w"))
    procs.append(service)
    ours_log = lambda: "\nour replicator's log, last lines:\n" + tail(f"{work}/replicator.log")

    wait_for("the admin socket", lambda: os.path.exists(admin), 20)
    t0 = time.time()
    wait_for("every user's first sync",
             lambda: (lambda s: len(s) == USERS and all(r[4] != 0 for r in s.values()))(rep_users(admin)), 3600)
    first_sync = time.time() - t0
    log(f"first sync of {USERS} users (empty Maildirs): {first_sync:.1f} s")

    results = latency(conf, users, homes) if RATES else []
    out = []  # the report, printed at the end

    # A full pass over every user with nothing changed: ours (the replicator, PARALLEL at
    # once over one SSH connection) against a cron loop of `doveadm sync -f` (one ssh each,
    # PARALLEL at once) and against Dovecot's replicator, into the same replicas.
    ours, ours_answered = [], []
    for i in range(PASSES):
        log(f"full pass, ours, {i + 1}/{PASSES} ({load()})")
        secs, kinds, answered = triggered_pass([MR, "-c", cfg, "replicate", "--full", "-p", "low", "*"], admin,
                                               users, ours_log)
        ours.append(secs)
        ours_answered.append(answered)
        log(f"  {secs:.2f} s (the request answered after {answered:.2f} s), syncs seen running: {dict(kinds)}")

    def doveadm_sync(user):
        subprocess.run(["doveadm", "-c", conf, "sync", "-f", "-u", user, "remoteprefix:root@127.0.0.1"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    cron = None
    if CRON:
        log(f"full pass, cron loop of doveadm sync -f ({load()})")
        service.send_signal(signal.SIGSTOP)  # the replicator sits still meanwhile
        t0 = time.time()
        with concurrent.futures.ThreadPoolExecutor(max_workers=PARALLEL) as pool:
            list(pool.map(doveadm_sync, users))
        cron = time.time() - t0
        service.send_signal(signal.SIGCONT)
        log(f"  {cron:.1f} s")
    hwm = mem(service.pid)["VmHWM"]
    # Stopped for good: Dovecot's replicator runs alone.
    service.send_signal(signal.SIGTERM)
    service.wait(120)

    dovecot = dovecot_replicator(work, remote_cmd, users, homes, cleanup) if DOVECOT_REPLICATOR else None
    rss = None
    if RSS_USERS:
        rss = []
        try:
            rss_phase(work, prefix, rss_id, rss_passwd, ssh, port, cleanup, rss)
        except (PassFailed, SystemExit, subprocess.SubprocessError, OSError) as e:
            log(f"memory phase: {e}")
            rss.append(f"  memory phase with {RSS_USERS} users could not finish: {e}")

    med = lambda xs: sorted(xs)[len(xs) // 2]
    span = lambda xs: f"{med(xs):.2f} s" + (f" (median of {len(xs)}: " + ", ".join(f"{x:.2f}" for x in xs) + ")"
                                           if len(xs) > 1 else "")
    print(f"replicator, {USERS} users, PARALLEL={PARALLEL}; first sync of every user (empty Maildirs): "
          f"{first_sync:.1f} s; {load()} at the end")
    if results:
        print(f"latency, {SECONDS:g} s per rate")
        print("| deliveries/s | deliveries | on the replica | not within 2 min | p50 | p99 | max |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for rate, n, ok, lost, p50, p99, mx in results:
            print(f"| {rate:g} | {n} | {ok} | {lost} | {p50:.2f} s | {p99:.2f} s | {mx:.2f} s |")
    print(f"full pass over {USERS} users, nothing changed, {PARALLEL} at once:")
    print(f"  ours, replicate --full -p low '*': {span(ours)}; the request itself answered after "
          + ", ".join(f"{a:.2f}" for a in ours_answered) + " s")
    if cron is not None:
        print(f"  cron loop of doveadm sync -f: {cron:.1f} s, ratio ours/cron {med(ours) / cron:.3f}")
    if dovecot is not None:
        if "startup" in dovecot:
            s, k, _ = dovecot["startup"]
            print(f"  Dovecot's replicator, at its start (no replicator.db: every user synced with -f, no state): "
                  f"{s:.2f} s, syncs seen running: {dict(k)}, ratio ours/it {med(ours) / s:.3f}")
        for key, what in (("replicate", "replicate -f -p low '*' (2.3 sends no -f: incremental from the states)"),
                          ("replicate_f", f"replicate -f -p low '*' with replication_dsync_parameters = "
                                          f"{DOVECOT_FULL_PARAMS} (every sync -f, as ours)")):
            if dovecot.get(key):
                secs = [s for s, _, _ in dovecot[key]]
                kinds = sum((k for _, k, _ in dovecot[key]), collections.Counter())
                print(f"  Dovecot's replicator, {what}: {span(secs)}, syncs seen running: {dict(kinds)}, "
                      f"ratio ours/it {med(ours) / med(secs):.3f}")
        if "error" in dovecot:
            print(f"  Dovecot's replicator could not finish: {dovecot['error']}")
    print(f"our replicator's peak RSS (VmHWM, {USERS} users, the whole run up to here): {hwm:.1f} MiB")
    if rss is not None:
        for line in rss:
            print(line)


def latency(conf, users, homes):
    lda = "/usr/lib/dovecot/dovecot-lda"
    counts = {u: 0 for u in users}
    lock = threading.Lock()
    pending = {}  # (user, n) -> time the source had it
    done = []

    def seen(user):
        n = 0
        for d in ("new", "cur"):
            try:
                n += sum(1 for _ in os.scandir(f"{homes[user]}/Maildir/{d}"))
            except FileNotFoundError:
                pass
        return n

    stop = threading.Event()
    stop_time = [0.0]

    def poller():
        while not stop.is_set() or pending:
            with lock:
                items = list(pending.items())
            now = time.time()
            by_user = {}
            for (u, n), t in items:
                by_user.setdefault(u, []).append((n, t))
            for u, ns in by_user.items():
                have = seen(u)
                for n, t in ns:
                    if have >= n:
                        with lock:
                            pending.pop((u, n), None)
                        done.append(now - t)
            if stop.is_set() and now > stop_time[0] + 120:
                break
            time.sleep(0.01)

    def deliver(user):
        msg = f"From: bench@example.org\nTo: {user}@example.org\nSubject: bench\n\nbody\n".encode()
        subprocess.run([lda, "-c", conf, "-d", user, "-f", "bench@example.org"], input=msg, check=True)
        t = time.time()
        with lock:
            counts[user] += 1
            pending[(user, counts[user])] = t

    results = []
    for rate in RATES:
        done.clear()
        stop.clear()
        th = threading.Thread(target=poller)
        th.start()
        n = int(rate * SECONDS)
        log(f"{n} deliveries at {rate:g}/s over {len(users)} users ({load()})")
        start = time.time()
        with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
            futs = []
            for i in range(n):
                at = start + i / rate
                delay = at - time.time()
                if delay > 0:
                    time.sleep(delay)
                futs.append(pool.submit(deliver, random.choice(users)))
            for f in futs:
                f.result()
        stop_time[0] = time.time()
        stop.set()
        th.join()
        lost = len(pending)
        lat = sorted(done)
        pct = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")
        results.append((rate, n, len(lat), lost, pct(0.5), pct(0.99), lat[-1] if lat else float("nan")))
        pending.clear()
    return results


def dovecot_conf(d, log, auth, remote_cmd, replica):
    """What both Dovecot instances' configurations share (the source's and the one that runs
    Dovecot's own replicator): directories under `d`, the users by `auth` (the inside of the
    passdb and userdb blocks), the replication plugin sending to `replica` over `remote_cmd`."""
    return f"""base_dir = {d}/run
state_dir = {d}/state
log_path = {log}
protocols =
ssl = no
listen = 127.0.0.1
mail_location = maildir:~/Source
first_valid_uid = 1000
passdb {{
  {auth}
}}
userdb {{
  {auth}
}}
namespace inbox {{
  inbox = yes
}}
service anvil {{
  chroot =
}}
dsync_remote_cmd = {remote_cmd}
mail_plugins = $mail_plugins notify replication
plugin {{
  mail_replica = {replica}
}}
"""


def dovecot_replicator(work, remote_cmd, users, homes, cleanup):
    """Dovecot 2.3's own replicator over the same users, replicas, sshd and wrapper. Returns
    {"startup": (secs, kinds), "replicate": [(secs, kinds)...], "replicate_f": [...]} and
    "error" if it could not finish."""
    d = f"{work}/dovecot-replicator"
    os.makedirs(f"{d}/state")
    with open(f"{d}/users", "w") as f:
        for u in users:
            pw = pwd.getpwnam(u)
            f.write(f"{u}::{pw.pw_uid}:{pw.pw_gid}::{homes[u]}::\n")
    conf = f"{d}/dovecot.conf"
    sock = f"{d}/run/replicator-doveadm"
    dlog = f"{d}/dovecot.log"
    failed_log = lambda: "\nDovecot's log, last lines:\n" + tail(dlog)

    def start(params):
        with open(conf, "w") as f:
            f.write(dovecot_conf(d, dlog, f"driver = passwd-file\n  args = {d}/users", remote_cmd,
                                 "remoteprefix:root@127.0.0.1")
                    + f"""replication_max_conns = {PARALLEL}
{f"replication_dsync_parameters = {params}" if params else ""}
service replicator {{
  process_min_avail = 1
  unix_listener replicator-doveadm {{
    mode = 0600
    user = root
  }}
}}
service doveadm {{
  unix_listener doveadm-server {{
    mode = 0600
  }}
}}
""")
        p = subprocess.Popen(["/usr/sbin/dovecot", "-F", "-c", conf], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=open(f"{d}/master.err", "a"), start_new_session=True)
        cleanup.procs.append(p)
        cleanup.groups.append(p.pid)
        # (The socket file of an earlier start stays behind: wait for an answer.)
        until = time.time() + 20
        while True:
            try:
                rep_query(sock, "STATUS")
                return p
            except OSError:
                pass
            if p.poll() is not None or time.time() > until:
                raise PassFailed("Dovecot did not start: " + tail(f"{d}/master.err") + failed_log())
            time.sleep(0.05)

    def stop(p):
        # A clean stop: the replicator writes replicator.db in its deinit.
        p.terminate()
        p.wait(60)
        stop_group(p.pid)

    out = {}
    trigger = ["doveadm", "-c", conf, "replicator", "replicate", "-f", "-p", "low", "*"]
    try:
        log(f"Dovecot's replicator: start, every user synced at once ({load()})")
        t0 = time.time()
        p = start(None)
        kinds = {}
        wait_pass(sock, users, int(t0), 3600, kinds, failed_log)
        out["startup"] = (time.time() - t0, collections.Counter(kinds.values()), 0.0)
        log(f"  {out['startup'][0]:.2f} s, syncs seen running: {dict(out['startup'][1])}")
        out["replicate"] = []
        for i in range(PASSES):
            log(f"Dovecot's replicator: replicate -f '*', {i + 1}/{PASSES} ({load()})")
            out["replicate"].append(triggered_pass(trigger, sock, users, failed_log))
            log("  %.2f s, syncs seen running: %s, the request answered after %.2f s"
                % (out["replicate"][-1][0], dict(out["replicate"][-1][1]), out["replicate"][-1][2]))
        stop(p)
        with open(f"{d}/state/replicator.db") as f:
            saved = sum(1 for _ in f)
        if saved != len(users):
            raise PassFailed(f"replicator.db has {saved} users, not {len(users)}")
        p = start(DOVECOT_FULL_PARAMS)
        # Every user known again, from replicator.db; nobody due.
        until = time.time() + 60
        while len(rep_users(sock)) < len(users):
            if time.time() > until:
                raise PassFailed("the restarted replicator did not list every user" + failed_log())
            time.sleep(0.1)
        out["replicate_f"] = []
        for i in range(PASSES):
            log(f"Dovecot's replicator ({DOVECOT_FULL_PARAMS}): replicate -f '*', {i + 1}/{PASSES} ({load()})")
            out["replicate_f"].append(triggered_pass(trigger, sock, users, failed_log))
            log("  %.2f s, syncs seen running: %s, the request answered after %.2f s"
                % (out["replicate_f"][-1][0], dict(out["replicate_f"][-1][1]), out["replicate_f"][-1][2]))
        stop(p)
    except (PassFailed, subprocess.SubprocessError, OSError) as e:
        log(f"Dovecot's replicator: {e}")
        out["error"] = str(e)
    return out


def rss_phase(work, prefix, uid, passwd, ssh, port, cleanup, lines):
    """Our replicator with RSS_USERS virtual users known; the report's lines go to `lines`."""
    n = RSS_USERS

    def add(line):
        lines.append(line)
        log(line)

    log(f"memory: {n} virtual users, uid/gid {uid} ({load()})")
    names = [f"{prefix}r{i}" for i in range(n)]
    base = f"{work}/home-rss"
    os.mkdir(base, 0o755)
    with open(passwd, "w") as f:
        for u in names:
            home = f"{base}/{u}"
            os.mkdir(home, 0o700)
            os.chown(home, uid, uid)
            f.write(f"{u}:x:{uid}:{uid}::{home}::\n")
    os.chmod(passwd, 0o644)
    cfg = f"{work}/mailreplica-rss.toml"
    admin = f"{work}/admin-rss"
    rlog = f"{work}/replicator-rss.log"
    with open(cfg, "w") as f:
        f.write(f"""mail_location = "maildir:~/Source"
first_valid_uid = 1000
userdb = "passwd-file:{passwd}"
ssh_key = "{ssh}/client-rss"
ssh_known_hosts = "{ssh}/known_hosts"

[replicator]
destination = "remoteprefix:root@127.0.0.1:{port}"
state_dir = "{work}/state-rss"
admin_socket = "{admin}"
max_parallel = {PARALLEL}
""")
    failed_log = lambda: "\nthe replicator's log, last lines:\n" + tail(rlog)

    def start():
        if os.path.exists(admin):
            os.unlink(admin)
        p = subprocess.Popen([MR, "-c", cfg, "replicator"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=open(rlog, "a"))
        cleanup.procs.append(p)
        wait_for("the admin socket", lambda: os.path.exists(admin) or p.poll() is not None, 120)
        if p.poll() is not None:
            sys.exit("replicator.py: the memory phase's replicator exited" + failed_log())
        return p

    def overview_done(o):
        return (o["Total number of known users"] == n and all(
            o[k] == 0 for k in o if k.startswith("Queued") or k.startswith("Waiting")))

    add(f"memory, our replicator with {n} users known (passwd-file userdb, every user replicated), "
                 f"PARALLEL={PARALLEL}:")
    # 1. The first start: every user listed and queued, then synced.
    t0 = time.time()
    p = start()
    wait_for("every user listed", lambda: rep_overview(admin)["Total number of known users"] == n, 600, 0.2)
    m = mem(p.pid)
    listed = time.time() - t0
    add(f"  listed and queued ({listed:.1f} s after the start; first syncs already running): "
                 f"VmHWM {m['VmHWM']:.1f} MiB, VmRSS {m['VmRSS']:.1f} MiB")
    peak_rss = 0.0
    until = time.time() + 7200
    while True:
        peak_rss = max(peak_rss, mem(p.pid)["VmRSS"])
        o = rep_overview(admin)
        if o.get("Waiting 'failed' requests") or o.get("Queued 'failed' requests"):
            sys.exit(f"replicator.py: memory phase: failed syncs: {o}" + failed_log())
        if overview_done(o) and not rep_running(admin):
            break
        if time.time() > until:
            sys.exit(f"replicator.py: memory phase: the first sync did not end: {o}" + failed_log())
        time.sleep(1)
    first = time.time() - t0
    m = mem(p.pid)
    rows = rep_users(admin)
    unsynced = sum(1 for r in rows.values() if r[4] == 0)
    if len(rows) != n or unsynced:
        sys.exit(f"replicator.py: memory phase: {len(rows)} users, {unsynced} never synced" + failed_log())
    add(f"  after the first sync of all {n} ({first:.1f} s from the start): VmHWM {m['VmHWM']:.1f} MiB "
                 f"(peak of the whole pass), VmRSS {m['VmRSS']:.1f} MiB (highest sampled each second: "
                 f"{peak_rss:.1f} MiB)")
    # 2. A restart from the saved records: every user known with a state, nothing due.
    p.terminate()
    p.wait(120)
    t0 = time.time()
    p = start()
    wait_for("every user loaded", lambda: overview_done(rep_overview(admin)), 600, 0.2)
    loaded = time.time() - t0
    time.sleep(5)
    o = rep_overview(admin)
    m = mem(p.pid)
    idle = "idle" if overview_done(o) and not rep_running(admin) else f"NOT idle: {o}"
    add(f"  restarted from its {n} records ({loaded:.1f} s to load), {idle} 5 s later: "
                 f"VmHWM {m['VmHWM']:.1f} MiB, VmRSS {m['VmRSS']:.1f} MiB")
    # 3. A no-change full pass over all of them, watched through the overview once a second
    #    (as the first sync): a `STATUS *` of 10,000 rows 20 times a second costs memory of its
    #    own, measured apart in 4. The request goes over the socket, not through `mailreplica
    #    replicate`, whose client gives up after 30 s: at 10,000 users the replicator answers
    #    later than that (the time it took is reported).
    wait_idle(admin)
    time.sleep(2)
    since = int(time.time()) + 1
    time.sleep(since - time.time())
    t0 = time.time()
    r = rep_query(admin, "REPLICATE\tlow\tf\t*", 3600, True)
    if not r[0].startswith("+"):
        raise PassFailed(f"REPLICATE: {r[0]}")
    answered = time.time() - t0
    until = time.time() + 7200
    while not (overview_done(rep_overview(admin)) and not rep_running(admin)):
        if time.time() > until:
            raise PassFailed("the full pass did not end" + failed_log())
        time.sleep(1)
    secs = time.time() - t0
    m = mem(p.pid)
    rows = rep_users(admin)
    behind = sum(1 for u in names if rows[u][2] < since or rows[u][4] < rows[u][2] or rows[u][3])
    add(f"  after a no-change full pass over the {n} (REPLICATE low f '*', as replicate --full -p low '*': "
        f"{secs:.1f} s, polled once a second; the request answered after {answered:.1f} s"
        + (f"; {behind} users NOT fully synced by it" if behind else "")
        + f"): VmHWM {m['VmHWM']:.1f} MiB, VmRSS {m['VmRSS']:.1f} MiB")
    # 4. What `replicator status '*'` over every user costs: 200 of them, one after the other.
    t0 = time.time()
    for _ in range(200):
        rep_users(admin)
    each = (time.time() - t0) / 200
    m = mem(p.pid)
    add(f"  after 200 requests STATUS '*' ({n} rows each, {each * 1000:.0f} ms each): "
        f"VmHWM {m['VmHWM']:.1f} MiB, VmRSS {m['VmRSS']:.1f} MiB")
    # 5. The same pass again, watched as the 1,000-user passes are: STATUS '*' and STATUS-DSYNC
    #    every 50 ms while it runs (a busy monitor).
    def replicate_all():
        r = rep_query(admin, "REPLICATE\tlow\tf\t*", 3600, True)
        if not r[0].startswith("+"):
            raise PassFailed(f"REPLICATE: {r[0]}")

    secs, _, answered = triggered_pass(replicate_all, admin, names, failed_log)
    m = mem(p.pid)
    add(f"  after the same pass polled with STATUS '*' and STATUS-DSYNC every 50 ms ({secs:.1f} s; the request "
        f"answered after {answered:.1f} s): VmHWM {m['VmHWM']:.1f} MiB, VmRSS {m['VmRSS']:.1f} MiB")
    p.terminate()
    p.wait(120)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Replication latency of `mailreplica replicator`: from a delivery on the source to the mail
being on the replica, at a given rate of deliveries spread over many users.

    sudo tests/bench/replicator.py                    1,000 users; 1/s then 50/s, 30 s each
    sudo USERS=100 RATES=1,10 SECONDS=20 tests/bench/replicator.py

The whole stack is real and on this host: Dovecot 2.3 (its `dovecot-lda` delivers, its
`replication` plugin notifies the replicator through the FIFO), `mailreplica replicator`
(PARALLEL syncs at once, default 8), one SSH connection to OpenSSH's sshd on 127.0.0.1, whose
root key forces `mailreplica-wrapper`, which drops to the user and writes ~/Maildir.

A delivery's latency is the time from `dovecot-lda` returning (the mail is on the source) to
the mail's file being in the user's replica (`new/` or `cur/` of ~/Maildir, polled every
10 ms). Deliveries are started at the rate asked for, each to a random user, by a pool of
threads, so that a slow delivery does not slow the schedule. Reported per rate: deliveries,
p50, p99 and max latency. Then a full pass over every user with nothing changed: the
replicator's (`replicate --full '*'`, until every user's full sync ended) against a cron loop
of `doveadm sync -f -u USER remoteprefix:…` (Dovecot 2.3's master, one ssh per user, PARALLEL
at once, into the same replicas; the replicator is stopped with SIGSTOP meanwhile). Last, the
replicator's peak RSS (VmHWM) over the whole run.

Needs root (throw-away users, removed at exit), Dovecot 2.3, sshd, ssh-keygen; the workspace
built first (cargo build --release --workspace). Works in /run/mrrep.*; KEEP=1 keeps it.
"""

import concurrent.futures
import json
import os
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
RATES = [float(r) for r in os.environ.get("RATES", "1,50").split(",")]
SECONDS = float(os.environ.get("SECONDS", "30"))
PARALLEL = int(os.environ.get("PARALLEL", "8"))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MR = os.environ.get("MAILREPLICA", f"{ROOT}/target/release/mailreplica")
WRAPPER = os.environ.get("WRAPPER", f"{ROOT}/target/release/mailreplica-wrapper")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def run(*cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def main():
    if os.geteuid() != 0:
        sys.exit("replicator.py: run as root (it creates throw-away users)")
    for f in (MR, WRAPPER):
        if not os.path.exists(f):
            sys.exit(f"replicator.py: {f} is missing: cargo build --release --workspace")
    work = tempfile.mkdtemp(prefix="mrrep.", dir="/run")
    os.chmod(work, 0o755)
    prefix = f"mrb{os.getpid()}x"
    users, procs = [], []
    try:
        bench(work, prefix, users, procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        for u in users:
            subprocess.run(["userdel", u], stderr=subprocess.DEVNULL)
        if os.environ.get("KEEP"):
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, cond, timeout):
    until = time.time() + timeout
    while not cond():
        if time.time() > until:
            sys.exit(f"replicator.py: timed out waiting for {what}")
        time.sleep(0.05)


def bench(work, prefix, users, procs):
    log(f"creating {USERS} users")
    homes = {}
    os.makedirs(f"{work}/home")
    for i in range(USERS):
        name = f"{prefix}{i}"
        home = f"{work}/home/{name}"
        run("useradd", "-M", "-U", "-d", home, "-s", "/usr/sbin/nologin", name)
        users.append(name)
        os.mkdir(home)
        shutil.chown(home, name, name)
        homes[name] = home
    # The replica side: the wrapper's policy, sshd forcing it.
    os.makedirs(f"{work}/etc", mode=0o755)
    policy = f"{work}/etc/wrapper.toml"
    with open(policy, "w") as f:
        f.write("[peer.mx1]\nallow_users = [%s]\nfirst_valid_uid = 1000\nlast_valid_uid = 4000000000\n"
                'mail_location = "maildir:~/Maildir"\n' % ", ".join(f'"{u}"' for u in users))
    os.chmod(policy, 0o644)
    ssh = f"{work}/ssh"
    os.mkdir(ssh, 0o700)
    for k in ("host", "client"):
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{ssh}/{k}")
    pub = open(f"{ssh}/client.pub").read().strip()
    ak = f"{ssh}/authorized_keys"
    with open(ak, "w") as f:
        f.write(f'restrict,command="{WRAPPER} --peer mx1 --policy {policy} --auth-log {work}/auth.log" {pub}\n')
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
    # The source: Dovecot with its replication plugin; the aggregator's listeners are ours.
    dv = f"{work}/dovecot"
    os.makedirs(f"{dv}/state")
    conf = f"{dv}/dovecot.conf"
    with open(conf, "w") as f:
        f.write(f"""base_dir = {dv}/run
state_dir = {dv}/state
log_path = {dv}/dovecot.log
protocols =
ssl = no
listen = 127.0.0.1
mail_location = maildir:~/Source
first_valid_uid = 1000
passdb {{
  driver = passwd
}}
userdb {{
  driver = passwd
}}
namespace inbox {{
  inbox = yes
}}
service anvil {{
  chroot =
}}
dsync_remote_cmd = ssh -F /dev/null -i {ssh}/client -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile={ssh}/known_hosts -p {port} -l%{{login}} %{{host}} doveadm dsync-server -u%u -U
mail_plugins = $mail_plugins notify replication
plugin {{
  mail_replica = remoteprefix:replica
}}
service aggregator {{
  fifo_listener replication-notify-fifo {{
    mode = 0
  }}
  unix_listener replication-notify {{
    mode = 0
  }}
}}
""")
    procs.append(subprocess.Popen(["/usr/sbin/dovecot", "-F", "-c", conf], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    wait_for("dovecot", lambda: os.path.exists(f"{dv}/run/auth-userdb"), 20)
    cfg = f"{work}/mailreplica.toml"
    with open(cfg, "w") as f:
        f.write(f"""mail_location = "maildir:~/Source"
first_valid_uid = 1000
ssh_key = "{ssh}/client"
ssh_known_hosts = "{ssh}/known_hosts"

[replicator]
destination = "remoteprefix:root@127.0.0.1:{port}"
state_dir = "{work}/state"
admin_socket = "{work}/admin"
plugin_fifo = "{dv}/run/replication-notify-fifo"
users = [{", ".join(f'"{u}"' for u in users)}]
max_parallel = {PARALLEL}
""")
    service = subprocess.Popen([MR, "-c", cfg, "replicator"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=open(f"{work}/replicator.log", "w"))
    procs.append(service)

    def status():
        out = subprocess.run([MR, "-c", cfg, "-f", "json", "replicator", "status"], capture_output=True, text=True)
        return json.loads(out.stdout) if out.returncode == 0 else []

    wait_for("the admin socket", lambda: os.path.exists(f"{work}/admin"), 20)
    t0 = time.time()
    wait_for("every user's first sync",
             lambda: (lambda s: len(s) == USERS and all(r["last_success"] != "0" for r in s))(status()), 3600)
    log(f"first sync of {USERS} users (empty Maildirs): {time.time() - t0:.1f} s")

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

    stop_time = [0.0]

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
        log(f"{n} deliveries at {rate:g}/s over {USERS} users")
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
    # A full pass over every user with nothing changed: ours (the replicator, PARALLEL at
    # once over one SSH connection) against a cron loop of `doveadm sync -f` (one ssh each,
    # PARALLEL at once), into the same replicas.
    def full_done(since):
        s = status()
        return len(s) == USERS and all(int(r["last_full_sync"]) >= since and r["running"] == "false"
                                       and r["priority"] == "none" for r in s)

    time.sleep(2)
    since = int(time.time()) + 1
    time.sleep(since - time.time())
    t0 = time.time()
    subprocess.run([MR, "-c", cfg, "replicate", "--full", "-p", "low", "*"], check=True,
                   stderr=subprocess.DEVNULL)
    wait_for("the full pass", lambda: full_done(since), 3600)
    ours = time.time() - t0

    def doveadm_sync(user):
        subprocess.run(["doveadm", "-c", conf, "sync", "-f", "-u", user, f"remoteprefix:root@127.0.0.1"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    service.send_signal(signal.SIGSTOP)  # the replicator sits still meanwhile
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        list(pool.map(doveadm_sync, users))
    cron = time.time() - t0
    service.send_signal(signal.SIGCONT)
    hwm = 0
    with open(f"/proc/{service.pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) // 1024
    print(f"replicator latency, {USERS} users, PARALLEL={PARALLEL}, {SECONDS:g} s per rate")
    print("| deliveries/s | deliveries | on the replica | not within 2 min | p50 | p99 | max |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for rate, n, ok, lost, p50, p99, mx in results:
        print(f"| {rate:g} | {n} | {ok} | {lost} | {p50:.2f} s | {p99:.2f} s | {mx:.2f} s |")
    print(f"full pass over {USERS} users, nothing changed, {PARALLEL} at once: replicator {ours:.1f} s, "
          f"cron loop of doveadm sync -f {cron:.1f} s, ratio {ours / cron:.2f}")
    print(f"replicator peak RSS (VmHWM, whole run): {hwm} MiB")
    service.send_signal(signal.SIGTERM)
    service.wait(120)


if __name__ == "__main__":
    main()

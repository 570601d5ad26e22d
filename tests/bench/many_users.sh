#!/usr/bin/env bash
# Many users, one host: `mailreplica -F USERS --parallel P sync remoteprefix:…` (one SSH
# connection, one channel per user) against Dovecot's way, one `doveadm sync -u USER
# remoteprefix:…` per user (one `ssh` per user, Dovecot's dsync_remote_cmd), P at a time with
# `xargs -P`, into the same sshd and the same mailreplica-wrapper, on the same data.
#
#   sudo tests/bench/many_users.sh                         100 users, 20 mails each, P=4, 5 rounds
#   sudo USERS=20 REPS=3 PARALLEL=2 tests/bench/many_users.sh
#   sudo USERS=1 MAILS=10000 PARALLEL=1 RECEIVER=upstream VERB=backup CHANGES=1 tests/bench/many_users.sh
#                                                          one user, stack against stack
#   sudo USERS=1 MAILS=10000 PARALLEL=1 RECEIVER=dovecot24 VERB=backup CHANGES=1 tests/bench/many_users.sh
#                                                          the two senders into Dovecot 2.4.1
#
# Each user has two identical sources, ~/SrcD (Dovecot's sender) and ~/SrcM (ours), and the
# wrapper writes Dovecot's replica to ~/ReplD and ours to ~/ReplM (two peers of its policy,
# one SSH key each). With RECEIVER=upstream the whole of Dovecot's stack is measured instead:
# Dovecot's key forces the upstream recipe, a shell script that reads the username and runs
# `doveadm dsync-server -u USER` on ~/ReplD (stack against stack; the default, RECEIVER=wrapper,
# compares the sending sides only). With RECEIVER=dovecot24 both keys force that recipe with
# Dovecot 2.4.1 (from the Debian 13 root `tests/run` makes, entered with unshare + chroot; its
# own daemon and a passwd-file of the users), on ~/ReplD and ~/ReplM: the two senders into the
# replica Dovecot 2.4 sites run. Phases:
#   initial    the first sync of every user into empty replicas, once per stack
#   nochange   everything synced, nothing changed since (no -s state: `-s` is per user and
#              doveadm refuses it with many users too), REPS rounds, the stacks alternating
#   changes    (CHANGES=1) 1% of each user's mails changed on the sources, each by its own
#              stack's tool (0.5% flagged, 0.25% expunged, 0.25% new files in new/), then one
#              sync per stack; REPS rounds
# Reported: median wall time of the whole run of each stack, the ratio ours/Dovecot's, and the
# SSH logins sshd accepted per round (ours: 1; Dovecot's: one per user). After the no-change
# rounds every user's replica is compared with its source, for both stacks.
#
# sshd runs every forced command through root's login shell, and bash run by sshd reads
# ~/.bashrc: on a host whose root .bashrc does real work (this project's machine runs
# `pyenv init`, ~80 ms per session), that cost lands on every session of both stacks. With
# MASK_ROOT_BASHRC=1 (the default) the benchmark's sshd runs in a private mount namespace in
# which /root/.bashrc is an empty file, as on a stock Debian root account; nothing outside
# that namespace changes. MASK_ROOT_BASHRC=0 measures with the host's own.
#
# Needs root (throw-away users, removed at exit), doveadm and dovecot (a private Dovecot daemon
# answers doveadm's user lookups), sshd, ssh, ssh-keygen, perl. Builds the workspace with
# `cargo build --release --workspace` unless MAILREPLICA and WRAPPER are set. Everything lives in
# a directory under /run (root-owned 0755 all the way up, as the wrapper demands); KEEP=1 keeps
# it.
set -euo pipefail

USERS=${USERS:-100}
MAILS=${MAILS:-20}
PARALLEL=${PARALLEL:-4}
REPS=${REPS:-5}
MASK_ROOT_BASHRC=${MASK_ROOT_BASHRC:-1}
RECEIVER=${RECEIVER:-wrapper}
CHANGES=${CHANGES:-0}
# sync (two-way, the default) or backup (one-way, the replica made equal to the source).
VERB=${VERB:-sync}
case $VERB in sync | backup) ;; *) echo "many_users.sh: VERB is sync or backup" >&2; exit 1 ;; esac
case $RECEIVER in wrapper | upstream | dovecot24) ;; *) echo "many_users.sh: RECEIVER is wrapper, upstream or dovecot24" >&2; exit 1 ;; esac
ROOT24=${MAILREPLICA_TEST_ROOTS:-/var/lib/mailreplica-tests}/trixie
cd "$(dirname "$0")/../.."
die() { echo "many_users.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root: it creates throw-away users (sudo $0)"
for t in doveadm /usr/sbin/dovecot /usr/sbin/sshd ssh ssh-keygen perl useradd userdel xargs; do
  command -v "$t" >/dev/null || die "$t is missing"
done
if [ "$RECEIVER" = dovecot24 ] && [ ! -x "$ROOT24/usr/bin/doveadm" ]; then
  die "no Debian 13 root with Dovecot 2.4 at $ROOT24 (tests/lab/debian-root.sh trixie $ROOT24 dovecot-core,dovecot-imapd)"
fi
if [ -z "${MAILREPLICA:-}" ] || [ -z "${WRAPPER:-}" ]; then
  cargo build --release --workspace >&2
  MAILREPLICA=$PWD/target/release/mailreplica
  WRAPPER=$PWD/target/release/mailreplica-wrapper
fi

WORK=$(mktemp -d /run/mrmany.XXXXXX)
chmod 755 "$WORK"
PREFIX=mrm$$x
names=()
pids=()
cleanup() {
  local p u
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  for u in "${names[@]}"; do userdel "$u" 2>/dev/null || true; done
  if [ -n "${KEEP:-}" ]; then
    echo "kept $WORK" >&2
  elif [ -d "$ROOT24$WORK" ] && ! rmdir "$ROOT24$WORK"; then
    echo "many_users.sh: $ROOT24$WORK is not empty; kept $WORK" >&2
  elif ! rm -rf "$WORK" || [ -e "$WORK" ]; then
    # Once seen: a daemon's last writes racing the removal. One more try, then say so.
    sleep 1
    rm -rf "$WORK" || echo "many_users.sh: could not remove $WORK" >&2
  fi
}
trap cleanup EXIT
mkdir -p "$WORK/home" "$WORK/keys" "$WORK/locks" "$WORK/out" "$WORK/dovecot/state"
chmod 755 "$WORK/home" "$WORK/dovecot" "$WORK/dovecot/state"
chmod 700 "$WORK/keys" "$WORK/locks"

# One Maildir, copied to every user's two sources.
echo "creating $USERS users with $MAILS mails each..." >&2
perl tests/bench/gen-maildir.pl "$WORK/template" "$MAILS" 4 1024 8192
for i in $(seq 1 "$USERS"); do
  u=$PREFIX$i
  useradd --no-create-home --home-dir "$WORK/home/$u" --shell /usr/sbin/nologin --user-group "$u"
  names+=("$u")
  mkdir -m 700 "$WORK/home/$u"
  cp -a "$WORK/template" "$WORK/home/$u/SrcD"
  cp -a "$WORK/template" "$WORK/home/$u/SrcM"
  chown -R "$u:$u" "$WORK/home/$u"
done
printf '%s\n' "${names[@]}" >"$WORK/users"
quoted=$(printf '"%s", ' "${names[@]}")

# The receiving side: sshd whose root keys force the wrapper, one peer per stack.
ssh-keygen -q -t ed25519 -N '' -f "$WORK/keys/host"
ssh-keygen -q -t ed25519 -N '' -f "$WORK/keys/ours"
ssh-keygen -q -t ed25519 -N '' -f "$WORK/keys/dovecot"
cat >"$WORK/wrapper.toml" <<EOF
lock_dir = "$WORK/locks"
[peer.ours]
allow_users = [${quoted%, }]
mail_location = "maildir:~/ReplM"
[peer.dovecot]
allow_users = [${quoted%, }]
mail_location = "maildir:~/ReplD"
EOF
chmod 644 "$WORK/wrapper.toml"
# The upstream recipe (Dovecot's wiki): read the name, run doveadm's dsync-server for it.
cat >"$WORK/upstream-wrapper.sh" <<EOF
#!/bin/sh
read -r username
exec doveadm -c $WORK/dovecot/dovecot.conf -o mail_location=maildir:~/ReplD dsync-server -u "\$username"
EOF
chmod 755 "$WORK/upstream-wrapper.sh"
if [ "$RECEIVER" = dovecot24 ]; then
  # Dovecot 2.4.1 in its root: /dev, /proc and $WORK mounted in a private mount namespace.
  mkdir -p "$ROOT24$WORK" "$WORK/dovecot24/state"
  chmod 755 "$WORK/dovecot24" "$WORK/dovecot24/state"
  cat >"$WORK/enter24.sh" <<EOF
#!/bin/sh
exec unshare --mount --propagation private sh -c 'mount --rbind /dev "\$0/dev" && mount -t proc proc "\$0/proc" && mount --bind "$WORK" "\$0$WORK" && exec chroot "\$0" "\$@"' "$ROOT24" "\$@"
EOF
  chmod 755 "$WORK/enter24.sh"
  for u in "${names[@]}"; do getent passwd "$u" | awk -F: '{ printf "%s:x:%s:%s::%s::\n", $1, $3, $4, $6 }'; done \
    >"$WORK/dovecot24/users.passwd"
  cat >"$WORK/dovecot24/dovecot.conf" <<EOF
dovecot_config_version = 2.4.1
dovecot_storage_version = 2.4.1
base_dir = $WORK/dovecot24/run
state_dir = $WORK/dovecot24/state
log_path = $WORK/dovecot24/dovecot.log
protocols =
mail_driver = maildir
mail_path = ~/ReplD
first_valid_uid = 1000
passdb passwd-file {
  passwd_file_path = $WORK/dovecot24/users.passwd
}
userdb passwd-file {
  passwd_file_path = $WORK/dovecot24/users.passwd
}
namespace inbox {
  inbox = yes
}
service anvil {
  chroot =
}
default_internal_user = dovecot
default_login_user = dovenull
EOF
  "$WORK/enter24.sh" /usr/sbin/dovecot -F -c "$WORK/dovecot24/dovecot.conf" </dev/null >>"$WORK/dovecot24/early.log" 2>&1 &
  pids+=("$!")
  for _ in $(seq 400); do [ -S "$WORK/dovecot24/run/auth-userdb" ] && break; sleep 0.05; done
  [ -S "$WORK/dovecot24/run/auth-userdb" ] || die "dovecot 2.4 did not start: $(cat "$WORK/dovecot24/"*.log)"
  # The same recipe per replica directory (2.4 expands `~` in -o when it parses it, with
  # root's HOME: the home is looked up here).
  for dir in ReplD ReplM; do
    cat >"$WORK/upstream24-$dir.sh" <<EOF
#!/bin/sh
read -r username
home=\$(getent passwd "\$username" | cut -d: -f6)
[ -n "\$home" ] || exit 1
exec $WORK/enter24.sh /usr/bin/doveadm -c $WORK/dovecot24/dovecot.conf -o "mail_path=\$home/$dir" dsync-server -u "\$username"
EOF
    chmod 755 "$WORK/upstream24-$dir.sh"
  done
fi
for peer in ours dovecot; do
  if [ "$RECEIVER" = dovecot24 ]; then
    if [ "$peer" = dovecot ]; then cmd="$WORK/upstream24-ReplD.sh"; else cmd="$WORK/upstream24-ReplM.sh"; fi
  elif [ "$peer" = dovecot ] && [ "$RECEIVER" = upstream ]; then
    cmd="$WORK/upstream-wrapper.sh"
  else
    cmd="$WRAPPER --peer $peer --policy $WORK/wrapper.toml --auth-log $WORK/out/auth.log"
  fi
  echo "restrict,command=\"$cmd\" $(cat "$WORK/keys/$peer.pub")"
done >"$WORK/keys/authorized_keys"
chmod 600 "$WORK/keys/authorized_keys"
mkdir -p /run/sshd
for attempt in 1 2 3 4 5; do
  PORT=$((20000 + RANDOM % 30000))
  cat >"$WORK/sshd_config" <<EOF
Port $PORT
ListenAddress 127.0.0.1
HostKey $WORK/keys/host
PidFile none
AuthorizedKeysFile $WORK/keys/authorized_keys
StrictModes yes
UsePAM no
PermitRootLogin forced-commands-only
PasswordAuthentication no
KbdInteractiveAuthentication no
MaxStartups 100:30:200
LogLevel VERBOSE
EOF
  : >"$WORK/out/sshd.log"
  if [ "$MASK_ROOT_BASHRC" = 1 ] && [ -e /root/.bashrc ]; then
    # exec keeps the pid: killing it at exit stops sshd.
    unshare -m --propagation private sh -c \
      'mount --bind /dev/null /root/.bashrc && exec /usr/sbin/sshd -D -e -f "$1"' sh "$WORK/sshd_config" \
      </dev/null >>"$WORK/out/sshd.log" 2>&1 &
  else
    /usr/sbin/sshd -D -e -f "$WORK/sshd_config" </dev/null >>"$WORK/out/sshd.log" 2>&1 &
  fi
  sshd_pid=$!
  for _ in $(seq 100); do
    grep -q "Server listening on" "$WORK/out/sshd.log" && break
    kill -0 "$sshd_pid" 2>/dev/null || break
    sleep 0.05
  done
  if grep -q "Server listening on" "$WORK/out/sshd.log"; then pids+=("$sshd_pid"); break; fi
  wait "$sshd_pid" 2>/dev/null || true
  [ "$attempt" = 5 ] && die "sshd did not start: $(cat "$WORK/out/sshd.log")"
done
echo "[127.0.0.1]:$PORT $(cat "$WORK/keys/host.pub")" >"$WORK/keys/known_hosts"

# The sending side. Dovecot: a private daemon for doveadm's `-u` lookups, and the remote
# command of deploy/dovecot-sender.conf.example pointed at this sshd.
cat >"$WORK/dovecot/dovecot.conf" <<EOF
base_dir = $WORK/dovecot/run
state_dir = $WORK/dovecot/state
log_path = $WORK/dovecot/dovecot.log
protocols =
listen = 127.0.0.1
ssl = no
mail_location = maildir:~/SrcD
first_valid_uid = 1000
passdb {
  driver = passwd
}
userdb {
  driver = passwd
}
namespace inbox {
  inbox = yes
}
service anvil {
  chroot =
}
default_internal_user = dovecot
default_login_user = dovenull
dsync_remote_cmd = ssh -F /dev/null -p $PORT -o UserKnownHostsFile=$WORK/keys/known_hosts -i $WORK/keys/dovecot -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=yes -l%{login} %{host} doveadm dsync-server -u%u -U
EOF
/usr/sbin/dovecot -F -c "$WORK/dovecot/dovecot.conf" </dev/null >>"$WORK/dovecot/dovecot.log" 2>&1 &
pids+=("$!")
for _ in $(seq 400); do [ -S "$WORK/dovecot/run/auth-userdb" ] && break; sleep 0.05; done
[ -S "$WORK/dovecot/run/auth-userdb" ] || die "dovecot did not start: $(cat "$WORK/dovecot/dovecot.log")"
cat >"$WORK/mailreplica.toml" <<EOF
mail_location = "maildir:~/SrcM"
first_valid_uid = 1000
ssh_key = "$WORK/keys/ours"
ssh_known_hosts = "$WORK/keys/known_hosts"
EOF

clean_env=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin TZ=UTC LANG=C.UTF-8)
run_dovecot() {
  "${clean_env[@]}" xargs -P "$PARALLEL" -I{} doveadm -c "$WORK/dovecot/dovecot.conf" "$VERB" -u {} \
    remoteprefix:root@127.0.0.1 <"$WORK/users"
}
run_ours() {
  "${clean_env[@]}" "$MAILREPLICA" -c "$WORK/mailreplica.toml" -F "$WORK/users" --parallel "$PARALLEL" \
    "$VERB" "remoteprefix:root@127.0.0.1:$PORT"
}
logins() { grep -c "Accepted publickey" "$WORK/out/sshd.log" || true; }
declare -A walls logins_per
timed() {
  local key=$1 t0 t1 before rc=0
  shift
  before=$(logins)
  t0=$(date +%s%N)
  "$@" 2>>"$WORK/out/$key.err" || rc=$?
  t1=$(date +%s%N)
  [ "$rc" = 0 ] || die "$key failed (exit $rc): $(tail -20 "$WORK/out/$key.err")"
  w=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (b - a) / 1e9 }')
  walls[$key]+="$w "
  logins_per[$key]=$(($(logins) - before))
  echo "$key: ${w}s, ${logins_per[$key]} SSH logins" >&2
}

# One round of PHASE for both stacks; which goes first alternates with the round number R.
both_stacks() {
  local phase=$1 r=$2
  if [ $((r % 2)) = 1 ]; then
    timed "$phase-dovecot" run_dovecot
    timed "$phase-ours" run_ours
  else
    timed "$phase-ours" run_ours
    timed "$phase-dovecot" run_dovecot
  fi
}

timed initial-dovecot run_dovecot
timed initial-ours run_ours
for r in $(seq 1 "$REPS"); do
  both_stacks nochange "$r"
done

# 1% of every user's mails changed on both sources alike, each by its own stack's tool.
change_sources() {
  local round=$1 u n flag expunge new_files box i f
  n=$((MAILS / 200)); [ "$n" -ge 1 ] || n=1
  flag=$n; expunge=$(((n + 1) / 2)); new_files=$(((n + 1) / 2))
  for u in "${names[@]}"; do
    # The same UIDs on both sources: each equals its replica since the last sync, and both
    # stacks give new mails the same UIDs.
    mapfile -t uids < <("${clean_env[@]}" "$MAILREPLICA" -c "$WORK/mailreplica.toml" -u "$u" -f tab \
      fetch uid mailbox INBOX all | tail -n +2 | shuf -n $((flag + expunge)) --random-source=<(yes "$round"))
    [ "${#uids[@]}" -gt 0 ] || continue
    for i in "${uids[@]:0:flag}"; do
      "${clean_env[@]}" "$MAILREPLICA" -c "$WORK/mailreplica.toml" -u "$u" flags add '\Flagged $Forwarded' mailbox INBOX uid "$i"
      "${clean_env[@]}" doveadm -c "$WORK/dovecot/dovecot.conf" flags add -u "$u" '\Flagged $Forwarded' mailbox INBOX uid "$i"
    done
    for i in "${uids[@]:flag}"; do
      "${clean_env[@]}" "$MAILREPLICA" -c "$WORK/mailreplica.toml" -u "$u" expunge mailbox INBOX uid "$i"
      "${clean_env[@]}" doveadm -c "$WORK/dovecot/dovecot.conf" expunge -u "$u" mailbox INBOX uid "$i"
    done
    box=$WORK/home/$u
    for i in $(seq 1 "$new_files"); do
      f=17200000$round.M${i}P1.bench
      printf 'From: a@example.org\nSubject: round %s mail %s\nMessage-ID: <r%s.%s@example.org>\n\nnew\n' \
        "$round" "$i" "$round" "$i" >"$box/SrcD/new/$f"
      cp "$box/SrcD/new/$f" "$box/SrcM/new/$f"
      chown "$u:$u" "$box/SrcD/new/$f" "$box/SrcM/new/$f"
    done
  done
}
if [ "$CHANGES" = 1 ]; then
  for r in $(seq 1 "$REPS"); do
    change_sources "$r"
    both_stacks changes "$r"
  done
fi

# Every replica equals its source (mailbox, uid, guid, flags), for both stacks.
listing() {
  "${clean_env[@]}" "$MAILREPLICA" -c "$WORK/mailreplica.toml" -u "$1" -o "mail_location=maildir:~/$2" -f tab \
    fetch 'mailbox uid guid flags' all | sed 's/ *\\Recent//' |
    # Keywords are a set: their order follows each Maildir's own dovecot-keywords letters.
    perl -F'\t' -lane 'if (@F > 3) { $F[3] = join " ", sort split / /, $F[3] } print join "\t", @F' | sort
}
for u in "${names[@]}"; do
  for pair in SrcD:ReplD SrcM:ReplM; do
    a=$(listing "$u" "${pair%%:*}")
    b=$(listing "$u" "${pair##*:}")
    [ "$a" = "$b" ] || { diff <(echo "$a") <(echo "$b") | head -20 >&2; die "$u: ${pair##*:} differs from ${pair%%:*}"; }
    [ "$(wc -l <<<"$a")" -gt "$MAILS" ] || die "$u: ${pair%%:*} has too few mails"
  done
done
echo "all $USERS users: both replicas equal their sources" >&2

median() { tr ' ' '\n' | grep . | sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
echo
echo "$USERS users, $MAILS mails each, $PARALLEL at a time ($(nproc) CPUs, MASK_ROOT_BASHRC=$MASK_ROOT_BASHRC, RECEIVER=$RECEIVER, VERB=$VERB, load average $(cut -d' ' -f1-3 /proc/loadavg)):"
echo
if [ "$RECEIVER" = dovecot24 ]; then
  echo "| phase, both into Dovecot 2.4.1's doveadm dsync-server behind the upstream recipe | Dovecot 2.3.19: doveadm $VERB + ssh per user | ours: mailreplica -F $VERB, one SSH connection | ratio (ours / Dovecot's) | SSH logins: Dovecot's / ours |"
elif [ "$RECEIVER" = upstream ]; then
  echo "| phase | Dovecot: doveadm $VERB + ssh per user, upstream wrapper + doveadm dsync-server | ours: mailreplica -F $VERB, one SSH connection, mailreplica-wrapper | ratio (ours / Dovecot's) | SSH logins: Dovecot's / ours |"
else
  echo "| phase | Dovecot: doveadm sync per user, ssh per user | ours: mailreplica -F, one SSH connection | ratio (ours / Dovecot's) | SSH logins: Dovecot's / ours |"
fi
echo "|---|---:|---:|---:|---:|"
phases="initial nochange"
if [ "$CHANGES" = 1 ]; then phases="$phases changes"; fi
for phase in $phases; do
  d=$(median <<<"${walls[$phase-dovecot]}")
  o=$(median <<<"${walls[$phase-ours]}")
  awk -v p="$phase" -v d="$d" -v o="$o" -v ld="${logins_per[$phase-dovecot]}" -v lo="${logins_per[$phase-ours]}" \
    'BEGIN { printf "| %s | %.3f s | %.3f s | %.2f | %d / %d |\n", p, d, o, o / d, ld, lo }'
done

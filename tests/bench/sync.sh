#!/usr/bin/env bash
# Two-way sync benchmark: `doveadm sync -s STATE` (the replicator's way) against Dovecot's own
# `doveadm dsync-server` and against `mailreplica dsync-server`, side by side on the same data.
#
#   sudo tests/bench/sync.sh                          100,000 mails in 50 mailboxes, 5 rounds
#   sudo MAILS=10000 REPS=3 tests/bench/sync.sh       a quick look
#   sudo MAILS=200000 BOXES=1 MIN_SIZE=200 MAX_SIZE=400 REPS=1 SEED=copy STATELESS=1 \
#        tests/bench/sync.sh                          the issue's one big mailbox
#
# SEED=copy: Dovecot's replica starts as a copy of ours after our initial sync, instead of
# its own initial sync (which takes Dovecot's slave about an hour for 200,000 mails in one
# mailbox); its initial time is then not measured. STATELESS=1: the 1% rounds run without a
# state, so every mail of every mailbox is compared (the most work, and memory, for a slave).
#
# Phases (the two slaves alternate; the page cache is warm):
#   initial    the first sync into an empty replica, once per slave
#   nochange   a sync with the saved state and nothing changed, REPS times per slave
#   changes    1% of the mails changed on each side (0.5% flag changes, 0.25% expunges and
#              0.25% new mails on the master, the same on the replica: doveadm changes
#              Dovecot's replica, mailreplica ours; new mails are delivered as files, as an
#              MDA would), then one sync; REPS rounds on the live pairs.
#              Every master mailbox's HIGHESTMODSEQ is raised first, so that the master syncs
#              all of them (with a state it would skip those only the replica changed).
# Reported: median wall time of the whole `doveadm sync` (master and slave), the ratio
# ours/Dovecot's, the slave's CPU time and peak RSS (`/usr/bin/time` around the slave), and for
# the no-change sync how many mail files each slave opened (strace; it must be none: only
# indexes are read when nothing changed).
#
# After each phase both pairs are compared: every master equals its replica, and our pair
# equals Dovecot's (UIDs, GUIDs, flags, mailbox GUIDs and UIDVALIDITY).
#
# Needs root (a throw-away user, removed at exit), doveadm, perl, strace and /usr/bin/time;
# builds mailreplica with `cargo build --release` unless MAILREPLICA is set. Nothing outside
# its temporary directory is touched. KEEP=1 keeps the directory.
set -euo pipefail

MAILS=${MAILS:-100000}
BOXES=${BOXES:-50}
REPS=${REPS:-5}
MIN_SIZE=${MIN_SIZE:-1024}
MAX_SIZE=${MAX_SIZE:-16384}
cd "$(dirname "$0")/../.."
. tests/bench/lib.sh
bench_setup sync.sh mrsync 'maildir:~/A' strace

# doveadm on one of the Maildirs (A and B: Dovecot's pair, A2 and S: ours).
dv_at() { local loc=$1; shift; as_user "$DOVEADM" -c "$WORK/dovecot.conf" -o "mail_location=maildir:~/$loc" "$@"; }
mr_at() { local loc=$1; shift; as_user "$WORK/mailreplica" -c "$WORK/mailreplica.toml" -o "mail_location=maildir:~/$loc" "$@"; }

generate "$WORK/home/A" "$MAILS" "$BOXES" "$MIN_SIZE" "$MAX_SIZE"
dv_at A -f tab mailbox status 'messages vsize' '*' >"$WORK/out/master-status.txt"
as_user cp -a "$WORK/home/A" "$WORK/home/A2"
total_mails=$(awk 'NR > 1 { n += $2 } END { print n }' "$WORK/out/master-status.txt")
total_mib=$(du -sm "$WORK/home/A" | cut -f1)
echo "master: $total_mails mails, $(($(wc -l <"$WORK/out/master-status.txt") - 1)) mailboxes, $total_mib MiB" >&2

# The two pairs: master Maildir, replica Maildir, slave command (with /usr/bin/time around the
# slave, and strace when STRACE is set).
master_of() { [ "$1" = dovecot ] && echo A || echo A2; }
replica_of() { [ "$1" = dovecot ] && echo B || echo S; }
slave_cmd() {
  local slave=$1 tag=$2 pre
  pre="/usr/bin/time -f %M_%U_%S -o $WORK/out/$tag.rss"
  [ -n "${STRACE:-}" ] && pre="$pre strace -f -qq -e trace=openat -o $WORK/out/$tag.strace"
  case $slave in
    dovecot) echo "$pre $DOVEADM -c $WORK/dovecot.conf -o mail_location=maildir:~/B dsync-server" ;;
    ours) echo "$pre $WORK/mailreplica -c $WORK/mailreplica.toml -o mail_location=maildir:~/S dsync-server" ;;
  esac
}
# One timed `doveadm sync -s STATE` of a pair; keeps the new state; prints "wall rss_user_sys".
run_sync() {
  local slave=$1 tag=$2 state wall
  wall="$WORK/out/$tag.wall"
  state=$(cat "$WORK/out/state-$slave" 2>/dev/null || true)
  [ -n "${STATELESS:-}" ] && [[ $tag == changes-* ]] && state=""
  local rc=0
  wall_clock "$wall" as_user "$DOVEADM" -c "$WORK/dovecot.conf" \
    -o "mail_location=maildir:~/$(master_of "$slave")" sync -s "$state" "$(slave_cmd "$slave" "$tag")" \
    >"$WORK/out/state-$slave.new" 2>"$WORK/out/$tag.log" || rc=$?
  # Exit 2 ("run again", with an empty state: the next sync is a full one) is allowed only
  # while the pair settles.
  # So is Dovecot's master's exit 75 after "Failed to do incremental sync ..., retry with a full
  # sync": it gives up on its side and prints an empty state (seen after the first sync of a
  # Maildir its index had not seen before).
  if [ "$rc" != 0 ] && ! { [[ $tag == settle-* ]] && { [ "$rc" = 2 ] ||
    { [ "$rc" = 75 ] && grep -q "retry with a full sync" "$WORK/out/$tag.log"; }; }; }; then
    cat "$WORK/out/$tag.log" >&2
    die "sync with $slave failed with exit code $rc ($tag)"
  fi
  grep -q . "$WORK/out/$tag.log" && { echo "--- $tag logged:" >&2; head -20 "$WORK/out/$tag.log" >&2; }
  mv "$WORK/out/state-$slave.new" "$WORK/out/state-$slave"
  echo "$(cat "$wall") $(tail -1 "$WORK/out/$tag.rss")"
}
view() { dv_at "$1" -f tab fetch 'mailbox uid guid flags' all | sed -E 's/\\Recent ?//; s/ +$//' | sort; }
status() { dv_at "$1" -f tab mailbox status 'messages uidnext uidvalidity guid' '*' | sort; }
same_pairs() {
  local what=$1
  for loc in A B A2 S; do view "$loc" >"$WORK/out/view-$loc"; status "$loc" >"$WORK/out/status-$loc"; done
  for p in "A B" "A2 S" "A A2"; do
    set -- $p
    diff "$WORK/out/view-$1" "$WORK/out/view-$2" >&2 || die "$what: $1 and $2 differ in UIDs, GUIDs or flags"
    diff "$WORK/out/status-$1" "$WORK/out/status-$2" >&2 || die "$what: $1 and $2 differ in mailbox status"
  done
}

declare -A opens
# One timed sync of each pair for round R of PHASE; which pair goes first alternates.
timed_round() {
  local phase=$1 r=$2 s w x order=(dovecot ours)
  ((r % 2 == 0)) && order=(ours dovecot)
  for s in "${order[@]}"; do
    read -r w x < <(run_sync "$s" "$phase-$s-$r")
    bench_record "$phase-$s" "$w" "$x"
  done
}

# 1. Initial sync into an empty replica.
rm -f "$WORK/out/state-dovecot" "$WORK/out/state-ours"
if [ "${SEED:-}" = copy ]; then
  read -r w x < <(run_sync ours initial-ours-1)
  bench_record initial-ours "$w" "$x"
  as_user cp -a "$WORK/home/S" "$WORK/home/B"
  find "$WORK/home/B" -name 'mailreplica-*' -delete
  echo "Dovecot's replica seeded with a copy of ours (SEED=copy): its initial sync is not timed" >&2
else
  timed_round initial 1
fi
# Settle: sync until the state no longer changes (both sides' HIGHESTMODSEQ meet).
for s in dovecot ours; do
  for i in 1 2 3 4 5 6; do
    before=$(cat "$WORK/out/state-$s" 2>/dev/null || true)
    run_sync "$s" "settle-$s-$i" >/dev/null
    [ -n "$before" ] && [ "$before" = "$(cat "$WORK/out/state-$s")" ] && break
  done
  echo "settled $s after $i syncs" >&2
done
same_pairs "after the initial sync"

# 2. Nothing changed.
for ((r = 1; r <= REPS; r++)); do
  timed_round nochange "$r"
done
for s in dovecot ours; do
  STRACE=1 run_sync "$s" "nochange-strace-$s" >/dev/null
  # Mail files opened: regular files in cur/ or new/ (directory opens for listing excluded).
  opens[$s]=$(grep -E 'openat\(.*/(cur|new)/[^"]+"' "$WORK/out/nochange-strace-$s.strace" | grep -vc O_DIRECTORY || true)
  echo "no-change sync: $s's slave opened ${opens[$s]} mail files" >&2
done
same_pairs "after the no-change syncs"

# 3. 1% changed on each side, REPS rounds on the live pairs, as replicas live. (Copies would
# give every file a new inode, which makes our index distrust its snapshots and rescan every
# mailbox; Dovecot's index does not look at inodes.) The comparison above ran doveadm on our
# replica, which rewrites files there; one status read lets our store take that in first, as
# the comparison ran doveadm on Dovecot's replica too.
mr_at S -f tab mailbox status messages '*' >/dev/null
n=$((MAILS / 100))
change_side() {
  # change_side TOOL LOC ROWS-ARRAY-NAME TAG: flags on half, expunges on a quarter, new mails
  # for the last quarter.
  local tool=$1 loc=$2 tag=$4 i box uid
  local -n list=$3
  local nflag=$((n / 2)) nexp=$((n / 4)) nnew=$((n - n / 2 - n / 4))
  declare -A flag_uids exp_uids
  for ((i = 0; i < nflag + nexp && i < ${#list[@]}; i++)); do
    read -r box uid <<<"${list[$i]}"
    if ((i < nflag)); then flag_uids[$box]+="${flag_uids[$box]:+,}$uid"; else exp_uids[$box]+="${exp_uids[$box]:+,}$uid"; fi
  done
  for box in "${!flag_uids[@]}"; do "$tool" "$loc" flags add '\Flagged $Forwarded' mailbox "$box" uid "${flag_uids[$box]}"; done
  for box in "${!exp_uids[@]}"; do "$tool" "$loc" expunge mailbox "$box" uid "${exp_uids[$box]}"; done
  for ((i = 0; i < nnew; i++)); do
    local f="$WORK/home/$loc/new/1800000000.M${i}P1.$tag"
    printf 'Subject: new %s %d\nMessage-ID: <%s%d@bench>\n\n%s\n' "$tag" "$i" "$tag" "$i" "$(head -c 4000 /dev/zero | tr '\0' x)" >"$f"
    chown "$USER_NAME:" "$f"
  done
}
for ((r = 1; r <= REPS; r++)); do
  # Which mails change, by (mailbox, uid): the same on both pairs, whose UIDs are equal, and
  # other mails each round. Read from Dovecot's master and Dovecot's replica only.
  mapfile -t rows < <(dv_at A -f tab fetch 'mailbox uid' all | tail -n +2 | awk -v k=$((5 + r)) 'NR % 89 == k')
  mapfile -t srows < <(dv_at B -f tab fetch 'mailbox uid' all | tail -n +2 | awk -v k=$((47 + r)) 'NR % 89 == k')
  change_side dv_at A rows "master$r"
  change_side dv_at A2 rows "master$r"
  change_side dv_at B srows "replica$r"
  change_side mr_at S srows "replica$r"
  # With a state the master syncs only the mailboxes it changed itself; raising every master
  # mailbox's HIGHESTMODSEQ makes it sync all of them, so that both runs do the same work and
  # the replicas' own changes are part of it.
  for m in A A2; do
    dv_at "$m" -f tab mailbox status highestmodseq '*' | tail -n +2 | while IFS=$'\t' read -r box hms; do
      dv_at "$m" mailbox update --min-highest-modseq $((hms + 1)) "$box"
    done
  done
  timed_round changes "$r"
done
same_pairs "after the 1% changes"

echo
echo "$(date -u +%F), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg); $total_mails mails, $total_mib MiB, $(($(wc -l <"$WORK/out/master-status.txt") - 1)) mailboxes; median of $REPS (initial: one run)"
echo
phases=(initial nochange changes)
[ "${SEED:-}" = copy ] && phases=(nochange changes)
bench_table "doveadm sync${STATELESS:+ (1% rounds without -s)} -s STATE" "${phases[@]}"
[ "${SEED:-}" = copy ] && echo "Our initial sync: $(tr -d ' ' <<<"${bench_wall[initial-ours]}") s, slave peak RSS $(($(tr -d ' ' <<<"${bench_rss[initial-ours]}") / 1024)) MiB (Dovecot's replica was seeded with a copy)."
echo
echo "Mail files opened by the slave during a no-change sync: Dovecot's ${opens[dovecot]}, ours ${opens[ours]}."

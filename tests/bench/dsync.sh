#!/usr/bin/env bash
# dsync backup benchmark: `doveadm backup` into Dovecot's own `doveadm dsync-server` and into
# `mailreplica dsync-server`, side by side on the same generated data (issue 3, "Speed").
#
#   sudo tests/bench/dsync.sh            10,000 mails (~200 MiB) in 20 mailboxes, 3 rounds
#   sudo MAILS=2000 REPS=1 tests/bench/dsync.sh     a quick look
#   sudo MAILS=200000 BOXES=1 MAX_SIZE=16384 REPS=1 tests/bench/dsync.sh   one big mailbox
#
# Phases, each run REPS times per slave (the two slaves alternate, the page cache is warm):
#   full         backup into an empty Maildir
#   incremental  backup after 1% of the mails changed on the master (flags of 0.6%, 0.2%
#                expunged, 0.2% new), into the replica the full run of the round made
# Reported: median (and minimum) wall time of the whole `doveadm backup` (master and slave),
# the ratio ours/Dovecot's, and the slave process's CPU time (median) and peak RSS (maximum),
# from a `/usr/bin/time` wrapped around the slave command doveadm starts. On a shared machine
# the disk is the noisy part (both slaves fsync every mail): the minimum and the CPU time are
# the steadier figures.
#
# Needs root (it creates a throw-away user, removed at exit), Dovecot's doveadm, perl and
# /usr/bin/time; builds mailreplica with `cargo build --release` unless MAILREPLICA is set.
# Nothing outside its temporary directory is touched (doveadm runs with its own sandbox
# config, no daemon). Set KEEP=1 to keep the directory, and PROFILE_OURS to a command prefix
# for our slave to profile it (e.g. PROFILE_OURS="strace -c -f -o /var/tmp/ours.strace"; no
# spaces inside words: doveadm splits the slave command on spaces).
set -euo pipefail

MAILS=${MAILS:-10000}
BOXES=${BOXES:-20}
REPS=${REPS:-3}
# Mail sizes, log-uniform between the two (bytes).
MIN_SIZE=${MIN_SIZE:-1024}
MAX_SIZE=${MAX_SIZE:-102400}
cd "$(dirname "$0")/../.."
. tests/bench/lib.sh
bench_setup dsync.sh mrbench 'maildir:~/Maildir'

dv() { as_user "$DOVEADM" -c "$WORK/dovecot.conf" "$@"; }

# ---------------------------------------------------------------------------------------------
# The master: BOXES mailboxes (INBOX, a hierarchy, lists), MAILS mails of 1 KiB to 100 KiB
# (log-uniform, ~22 KiB on average), two thirds \Seen, some flagged or with keywords. Written
# as a delivery agent would (files in cur/ with their flags), then indexed by Dovecot.
generate "$WORK/home/Maildir" "$MAILS" "$BOXES" "$MIN_SIZE" "$MAX_SIZE"
dv -f tab mailbox status 'messages vsize' '*' >"$WORK/out/master-status.txt"
total_mails=$(awk 'NR > 1 { n += $2 } END { print n }' "$WORK/out/master-status.txt")
total_mib=$(du -sm "$WORK/home/Maildir" | cut -f1)
echo "master: $total_mails mails, $(($(wc -l <"$WORK/out/master-status.txt") - 1)) mailboxes, $total_mib MiB on disk" >&2

# ---------------------------------------------------------------------------------------------
# One timed backup into ~/DEST with SLAVE (dovecot|ours); prints "wall_seconds
# slave_kib_user_sys" (the slave's peak RSS in KiB and its CPU seconds).
slave_cmd() {
  local slave=$1 dest=$2 rss=$3
  case $slave in
    dovecot) echo "/usr/bin/time -f %M_%U_%S -o $rss $DOVEADM -c $WORK/dovecot.conf -o mail_location=maildir:~/$dest dsync-server" ;;
    ours) echo "/usr/bin/time -f %M_%U_%S -o $rss ${PROFILE_OURS:+$PROFILE_OURS }$WORK/mailreplica -c $WORK/mailreplica.toml -o mail_location=maildir:~/$dest" ;;
  esac
}
warm() { find "$WORK/home" -type f -exec cat {} + >/dev/null; }
run_backup() {
  local slave=$1 dest=$2 tag=$3
  local rss="$WORK/out/$tag.rss" wall="$WORK/out/$tag.wall"
  warm
  if ! wall_clock "$wall" as_user "$DOVEADM" -c "$WORK/dovecot.conf" backup \
    "$(slave_cmd "$slave" "$dest" "$rss")" 2>"$WORK/out/$tag.log"; then
    cat "$WORK/out/$tag.log" >&2
    die "backup into $slave failed ($tag)"
  fi
  grep -q . "$WORK/out/$tag.log" && { echo "--- $tag logged:" >&2; head -20 "$WORK/out/$tag.log" >&2; }
  echo "$(cat "$wall") $(tail -1 "$rss")"
}
same_replicas() {
  local a b m
  m=$(dv -f tab mailbox status 'messages uidnext uidvalidity guid' '*' | sort)
  a=$(dv -o "mail_location=maildir:~/$1" -f tab mailbox status 'messages uidnext uidvalidity guid' '*' | sort)
  b=$(dv -o "mail_location=maildir:~/$2" -f tab mailbox status 'messages uidnext uidvalidity guid' '*' | sort)
  [ "$a" = "$m" ] || die "Dovecot's replica $1 differs from the master"
  [ "$b" = "$m" ] || die "our replica $2 differs from the master"
  # Flags without \Recent, keywords sorted (Dovecot prints them in the order its index
  # learned them).
  local norm='chomp; my @f = split /\t/, $_, -1; $f[3] = join " ", sort grep { $_ ne "\\Recent" } split / /, $f[3]; print join("\t", @f), "\n"'
  dv -o "mail_location=maildir:~/$1" -f tab fetch 'mailbox uid guid flags' all | perl -ne "$norm" | sort >"$WORK/out/a"
  dv -o "mail_location=maildir:~/$2" -f tab fetch 'mailbox uid guid flags' all | perl -ne "$norm" | sort >"$WORK/out/b"
  diff "$WORK/out/a" "$WORK/out/b" >&2 || die "the replicas $1 and $2 differ in UIDs, GUIDs or flags"
}

# 1% of the master changes (round $1 picks other mails than earlier rounds): flags on 0.6%,
# 0.2% expunged, 0.2% new (20 KiB each, into INBOX).
change_master() {
  local round=$1 n nflag nexp nnew i box uid
  n=$((MAILS / 100)); nflag=$((n * 6 / 10)); nexp=$((n * 2 / 10)); nnew=$((n - nflag - nexp))
  mapfile -t rows < <(dv -f tab fetch 'mailbox uid' all | tail -n +2 | awk -v r="$round" 'NR % 97 == r')
  for ((i = 0; i < nflag + nexp && i < ${#rows[@]}; i++)); do
    read -r box uid <<<"${rows[$i]}"
    if ((i < nflag)); then
      dv flags add '\Flagged $Forwarded' mailbox "$box" uid "$uid"
    else
      dv expunge mailbox "$box" uid "$uid"
    fi
  done
  for ((i = 0; i < nnew; i++)); do
    printf 'Subject: new %d.%d\nMessage-ID: <new%d.%d@bench>\n\n%s\n' "$round" "$i" "$round" "$i" \
      "$(head -c 20000 /dev/zero | tr '\0' x)" | dv save -m INBOX
  done
}

# Each round: a full backup into an empty Maildir with each slave, 1% of the master changed,
# then an incremental backup into the replica each slave just made (as a replica lives: its
# own files, not a copy).
record() {
  local phase=$1 s=$2 r=$3 w x
  read -r w x < <(run_backup "$s" "$s-replica" "$phase-$s-$r")
  bench_record "$phase-$s" "$w" "$x"
}
for ((r = 1; r <= REPS; r++)); do
  order=(dovecot ours)
  ((r % 2 == 0)) && order=(ours dovecot)
  for s in "${order[@]}"; do
    rm -rf "$WORK/home/$s-replica"
    record full "$s" "$r"
  done
  # (The replicas are checked after the incremental run only: doveadm reading our replica
  # here would make the incremental run start from a Maildir Dovecot just rewrote files of.)
  echo "changing 1% of the master..." >&2
  change_master "$r"
  for s in "${order[@]}"; do
    record incremental "$s" "$r"
  done
  same_replicas dovecot-replica ours-replica
done

echo
echo "$(date -u +%F), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg); $total_mails mails, $total_mib MiB, $(($(wc -l <"$WORK/out/master-status.txt") - 1)) mailboxes; median of $REPS"
echo
bench_table phase full incremental

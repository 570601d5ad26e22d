#!/bin/bash
# Peak memory of our master (and of our slave) on one large mailbox: what BENCHMARKS.md reports
# under "Memory per mail".
#
#   sudo tests/bench/master-rss.sh MAILS [MAILREPLICA]     e.g. 400000, 1000000
#
# As a throw-away user (removed at exit, with the work directory), writes one mailbox of MAILS
# mails of 200-400 bytes (gen-maildir.pl, no index of any tool), then runs our master into our
# slave as a separate process (a command destination), each process's VmHWM polled from /proc
# every 0.2 s (/usr/bin/time on the master would also count the slave, its child):
#
#   1. `backup` into an empty Maildir, the source without an index of ours and without a
#      dovecot-uidlist (its first open scans the directory and lists every file: the worst
#      case);
#   2. `sync` without a state, nothing changed, both sides indexed;
#   3. the same after one mail was delivered into the source's new/: its open lists both
#      directories and matches them against the uidlist (what every open after a delivery does).
#   4. `backup -R` from that replica into an empty Maildir: the master receives every mail
#      (its importer's side).
#   5. `backup -R` into that Maildir again, from another one of MAILS unrelated mails (its
#      INBOX another mailbox): the master deletes its INBOX of MAILS mails, then receives.
#
# DOVECOT=1 then runs the same cases with Dovecot's `doveadm` as the master, on a copy of the
# source made before any tool opened it, into the same slave (`mailreplica dsync-server`),
# and prints the ratios (ours / Dovecot's) of the master's peak RSS and of the wall time.
#
# ONLY_RECEIVE=1 runs only a `backup -R` into an empty Maildir from the written source (which
# our slave then indexes on its first open): the master's receiving side alone, for the largest
# mailboxes, where the other cases take long.
#
# Needs root and about 4 KiB of disk per mail on each side (twice that with DOVECOT=1). WORK
# (default /var/tmp) is where the work directory is made; KEEP=1 keeps it.
set -euo pipefail
MAILS=${1:?usage: master-rss.sh MAILS [MAILREPLICA]}
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=$(readlink -f "${2:-$HERE/../../target/release/mailreplica}")
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
[ -x "$BIN" ] || { echo "$BIN: not built (cargo build --release)" >&2; exit 1; }

DIR=$(mktemp -d "${WORK:-/var/tmp}/mrrss.XXXXXX")
USER_NAME=mrrss$$
cleanup() {
    pkill -f "^$DIR/mailreplica " 2>/dev/null || true
    userdel "$USER_NAME" 2>/dev/null || true
    [ "${KEEP:-0}" = 1 ] || rm -rf "$DIR"
}
trap cleanup EXIT
useradd -M -d "$DIR" "$USER_NAME"
# A copy, so that a rebuild during the run does not change the binary mid-way.
cp "$BIN" "$DIR/mailreplica"
chmod 755 "$DIR" "$DIR/mailreplica"
chown "$USER_NAME:" "$DIR"
as_user() { setpriv --reuid "$USER_NAME" --regid "$USER_NAME" --init-groups env HOME="$DIR" "$@"; }

echo "writing $MAILS mails ($(date -u +%H:%M:%S))" >&2
as_user perl "$HERE/gen-maildir.pl" "$DIR/src" "$MAILS" 1 200 400
# A Maildir written a moment ago has directories whose mtime may still change unseen within
# the same tick: our store does not trust a snapshot of them and scans again at the next
# open. FRESH=1 measures that case; by default the run waits it out, as for a Maildir
# written earlier (a site migrating its mail).
[ "${FRESH:-0}" = 1 ] || sleep 3
if [ "${DOVECOT:-0}" = 1 ]; then
    as_user cp -a "$DIR/src" "$DIR/dvsrc"
    as_user mkdir "$DIR/dvdst"
    cat > "$DIR/dovecot.conf" <<EOF
protocols =
ssl = no
base_dir = $DIR/dvrun
log_path = /dev/stderr
mail_location = maildir:$DIR/dvsrc
first_valid_uid = 100
namespace inbox {
  inbox = yes
}
EOF
    chmod 644 "$DIR/dovecot.conf"
fi

hwm() { awk '/VmHWM/ { print $2 }' "/proc/$1/status" 2>/dev/null || true; }
# The resident heap and the resident pages of files (the lists a large mailbox keeps in a file,
# see src/spill.rs), in KiB, as "anon file".
parts() { awk '/RssAnon/ { a = $2 } /RssFile/ { f = $2 } END { if (a != "") print a, f }' "/proc/$1/status" 2>/dev/null || true; }

# run MODE WHAT [dovecot]: one master run (ours, or Dovecot's) of $DIR/$MASTER (default src;
# Dovecot's: dv$MASTER) with $DIR/$SLAVE (default dst; Dovecot's: dv$SLAVE); MODE is split
# into words ("backup -R").
# Prints wall time and both peaks, and keeps them in $DIR/last.
run() {
    local mode=$1 dst=${SLAVE:-dst} master
    if [ "${3:-}" = dovecot ]; then
        dst=dv${SLAVE:-dst}
        master="doveadm -c $DIR/dovecot.conf -o mail_location=maildir:$DIR/dv${MASTER:-src}"
    else
        master="$DIR/mailreplica -o mail_location=maildir:$DIR/${MASTER:-src}"
    fi
    local slave="$DIR/mailreplica -o mail_location=maildir:$DIR/$dst dsync-server"
    local start end pid s h p mpeak=0 speak=0 manon=0 mfile=0 rc=0
    start=$(date +%s.%N)
    # Not through as_user: a function in the background is a subshell, and $! would be it.
    setpriv --reuid "$USER_NAME" --regid "$USER_NAME" --init-groups env HOME="$DIR" USER="$USER_NAME" \
        $master $mode "$slave" > "$DIR/out" 2> "$DIR/err" &
    pid=$!
    # setpriv and env exec: $pid becomes the master; the slave is its only child.
    while kill -0 "$pid" 2>/dev/null; do
        s=$(pgrep -P "$pid" | head -1 || true)
        h=$(hwm "$pid"); [ -n "$h" ] && [ "$h" -gt "$mpeak" ] && mpeak=$h
        p=$(parts "$pid")
        if [ -n "$p" ]; then
            [ "${p% *}" -gt "$manon" ] && manon=${p% *}
            [ "${p#* }" -gt "$mfile" ] && mfile=${p#* }
        fi
        if [ -n "$s" ]; then h=$(hwm "$s"); [ -n "$h" ] && [ "$h" -gt "$speak" ] && speak=$h; fi
        sleep 0.2
    done
    wait "$pid" || rc=$?
    end=$(date +%s.%N)
    if [ "$rc" != 0 ]; then
        echo "$mode failed with exit $rc:" >&2
        tail -5 "$DIR/err" >&2
        exit 1
    fi
    awk -v what="$2${3:+ ($3)}" -v s="$start" -v e="$end" -v m="$mpeak" -v sl="$speak" -v a="$manon" -v f="$mfile" 'BEGIN {
        printf "%-50s wall %7.1f s   master peak RSS %5.1f MiB (at most %.1f heap, %.1f files)   slave peak RSS %5.1f MiB\n", what, e - s, m / 1024, a / 1024, f / 1024, sl / 1024
    }'
    echo "$start $end $mpeak" > "$DIR/last"
}

# deliver DIR: one more mail into DIR/new, as a delivery agent writes it.
deliver() {
    as_user sh -c "printf 'Subject: one more\n\nbody\n' > '$1/new/1999999999.M1P1.delivered'"
}

# both MODE WHAT: ours, then Dovecot's (with DOVECOT=1), and the ratios.
both() {
    local ours dv
    run "$1" "$2"
    ours=$(cat "$DIR/last")
    [ "${DOVECOT:-0}" = 1 ] || return 0
    run "$1" "$2" dovecot
    dv=$(cat "$DIR/last")
    awk -v o="$ours" -v d="$dv" -v what="$2" 'BEGIN {
        split(o, a, " "); split(d, b, " ")
        printf "%-50s ours / Dovecot: master peak RSS %.2f, wall %.2f\n", what, a[3] / b[3], (a[2] - a[1]) / (b[2] - b[1])
    }'
}

as_user mkdir "$DIR/dst"
echo "binary: $BIN, sha256 $(sha256sum "$BIN" | cut -c1-12); $MAILS mails in one mailbox" >&2
if [ "${ONLY_RECEIVE:-0}" = 1 ]; then
    as_user mkdir "$DIR/rev"
    MASTER=rev SLAVE=src run "backup -R" "backup -R into an empty Maildir (receives all)"
    as_user "$DIR/mailreplica" -o "mail_location=maildir:$DIR/rev" mailbox status "messages uidnext" INBOX >&2
    exit 0
fi
both backup "backup into an empty Maildir (no index)"
both sync "sync without a state, nothing changed"
# One delivery into new/: the next open of the source must list both directories again and
# match them against the uidlist (no index can be trusted across a change of new/).
deliver "$DIR/src"
if [ "${DOVECOT:-0}" = 1 ]; then deliver "$DIR/dvsrc"; fi
both sync "sync without a state, after one delivery"
as_user mkdir "$DIR/rev"
if [ "${DOVECOT:-0}" = 1 ]; then as_user mkdir "$DIR/dvrev"; fi
MASTER=rev both "backup -R" "backup -R into an empty Maildir (receives all)"

# INBOX there is now another mailbox (another GUID) than rev's: a backup into rev deletes rev's
# INBOX of MAILS mails first (the deletion's memory), then receives the other's.
echo "writing $MAILS unrelated mails ($(date -u +%H:%M:%S))" >&2
as_user env GEN_HOST=other perl "$HERE/gen-maildir.pl" "$DIR/other" "$MAILS" 1 200 400
if [ "${DOVECOT:-0}" = 1 ]; then as_user cp -a "$DIR/other" "$DIR/dvother"; fi
[ "${FRESH:-0}" = 1 ] || sleep 3
SLAVE=other MASTER=rev run "backup -R" "backup -R replacing a mailbox (deletes it first)"
if [ "${DOVECOT:-0}" = 1 ]; then
    # Dovecot 2.3.19's master refuses this one ("mailbox_delete failed: INBOX can't be
    # deleted", exit 65): reported, not compared.
    (SLAVE=other MASTER=rev run "backup -R" "backup -R replacing a mailbox (deletes it first)" dovecot) ||
        echo "backup -R replacing a mailbox: Dovecot's master failed (above); no ratio" >&2
fi

#!/usr/bin/env bash
# Store benchmark: mailreplica against Dovecot's doveadm on the same Maildir, side by side.
# Not part of the test suite. Run as root from the repository root:
#
#   tests/bench/store.sh [DIR]        DIR: where the data goes (default /var/tmp, i.e. disk)
#
# Environment: MESSAGES (default 100000), SAVES (default 10000), KEEP=1 keeps the data,
# MAILREPLICA=path benchmarks that binary instead of building this tree.
#
# 1. Builds a Maildir of MESSAGES realistic small mails (1-6 KB, headers as a real mailbox has
#    them, 85 % read, some flagged/answered/keywords, 15 % still in new/) with a dovecot-uidlist
#    as Dovecot leaves it, and no index of either tool.
# 2. fetch 'uid guid flags' mailbox INBOX, both tools (their outputs are compared first, so
#    both do the same work): first runs (neither tool's index exists) with the page cache
#    dropped and with a warm cache, three rounds each with alternating order; then second
#    runs (indexes exist), five rounds. Medians.
# 3. SAVES mails saved one process per mail, both tools, each into an empty mailbox and with
#    its default durability (Dovecot: mail_fsync=optimized; us: fdatasync file, fsync dir,
#    fdatasync uidlist); then SAVES/10 into the big INBOX, where most mail is delivered. The
#    tools take turns in batches, so that other load on the machine hits both alike.
#
# Both tools run as the same throw-away user (no privilege change per call). Prints a
# markdown table of wall-clock and CPU (user+sys) seconds with the ratios ours / Dovecot.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "store.sh: run as root (it creates a throw-away user)" >&2; exit 1; }
command -v doveadm >/dev/null || { echo "store.sh: doveadm is not installed (apt-get install dovecot-core)" >&2; exit 1; }
command -v perl >/dev/null || { echo "store.sh: perl is needed to generate the mails" >&2; exit 1; }

MESSAGES=${MESSAGES:-100000}
SAVES=${SAVES:-10000}
BASE=${1:-/var/tmp}
if [ -n "${MAILREPLICA:-}" ]; then
  MR=$(realpath "$MAILREPLICA")  # e.g. an older build, for before/after figures
else
  cargo build --release --quiet
  MR=$PWD/target/release/mailreplica
fi

calc() { awk "BEGIN { printf \"%.3f\", $1 }"; }
# Names of our own, distinct from other benchmarks' (mailreplica's dsync benchmark uses mrbench.*).
work=$(mktemp -d "$BASE/mailreplica-store-bench.XXXXXX")
user="mrstorebench$$"
cleanup() {
  userdel "$user" 2>/dev/null || true
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
chmod 755 "$work"
home=$work/home
useradd --no-create-home --home-dir "$home" --shell /usr/sbin/nologin --user-group "$user"
mkdir -p "$home" "$work/run"
cat > "$work/dovecot.conf" <<EOF
protocols =
ssl = no
base_dir = $work/run
log_path = /dev/stderr
mail_location = maildir:~/Maildir
first_valid_uid = 100
namespace inbox {
  inbox = yes
}
EOF
printf 'mail_location = "maildir:~/Maildir"\nfirst_valid_uid = 100\n' > "$work/mailreplica.toml"

echo "generating $MESSAGES mails in $work ..." >&2
t0=$(date +%s.%N)
perl - "$home/Maildir" "$MESSAGES" <<'PERL'
use strict; use warnings;
my ($root, $n) = @ARGV;
mkdir $root; mkdir "$root/$_" for qw(cur new tmp);
srand(42);
my @words = qw(the of and to in is that for it as with was on be by this are at from have or an
  meeting report budget project deadline review update schedule invoice customer server backup
  release please thanks regards tomorrow monday quarterly figures attached draft comments team);
my $host = "bench";
my $uidlist = "";
my $t = 1700000000;
for my $i (1 .. $n) {
  $t += 1 + int(rand(60));
  my $body = "";
  my $want = 1000 + int(rand(5000));
  while (length($body) < $want) {
    my $line = "";
    $line .= $words[int(rand(@words))] . " " while length($line) < 60 + int(rand(15));
    $body .= "$line\n";
  }
  my $hdr = "Return-Path: <sender$i\@example.org>\nDelivered-To: user\@example.com\n"
    . "Received: from mx" . ($i % 7) . ".example.org (mx.example.org [192.0.2." . ($i % 250) . "])\n"
    . "\tby mail.example.com (Postfix) with ESMTPS id 4F$i; Thu, 1 Jan 2026 00:00:00 +0000\n"
    . "Message-ID: <$i.$t\@example.org>\nDate: Thu, 1 Jan 2026 00:00:00 +0000\n"
    . "From: Sender $i <sender$i\@example.org>\nTo: User <user\@example.com>\n"
    . "Subject: Benchmark message $i about the " . $words[$i % @words] . "\n"
    . "MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n";
  my $mail = $hdr . $body;
  my $size = length($mail);
  my $lfs = ($mail =~ tr/\n//);
  my $base = sprintf("%d.M%dP%d.%s,S=%d,W=%d", $t, int(rand(1000000)), 1000 + $i % 30000, $host, $size, $size + $lfs);
  my $r = rand();
  my ($dir, $name);
  if ($r < 0.15) { ($dir, $name) = ("new", $base); }
  else {
    my $fl = $r < 0.20 ? "FS" : $r < 0.23 ? "RS" : $r < 0.25 ? "Sa" : $r < 0.26 ? "Sb" : "S";
    ($dir, $name) = ("cur", "$base:2,$fl");
  }
  open(my $f, ">", "$root/$dir/$name") or die "$root/$dir/$name: $!";
  print $f $mail; close $f;
  utime($t, $t, "$root/$dir/$name");
  $uidlist .= "$i :$base\n";
}
open(my $u, ">", "$root/dovecot-uidlist") or die;
print $u "3 V1700000000 N" . ($n + 1) . " G0123456789abcdef0123456789abcdef\n" . $uidlist; close $u;
open(my $k, ">", "$root/dovecot-keywords") or die; print $k "0 \$Junk\n1 \$NotJunk\n"; close $k;
open(my $v, ">", "$root/dovecot-uidvalidity") or die; print $v "65920780"; close $v;
open($v, ">", "$root/dovecot-uidvalidity.65920780") or die; close $v;
PERL
chown -R "$user:$user" "$home"
t1=$(date +%s.%N)
size=$(du -sh "$home/Maildir" | cut -f1)
echo "generated in $(calc "$t1 - $t0") s ($size)" >&2

as_user() { setpriv --reuid="$user" --regid="$user" --clear-groups env -i PATH="$PATH" HOME="$home" USER="$user" TZ=UTC "$@"; }
dv() { as_user doveadm -c "$work/dovecot.conf" "$@"; }
mr() { as_user "$MR" -c "$work/mailreplica.toml" "$@"; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null && echo dropped || echo "not dropped"; }
# Runs a command (stdout to $1) and prints "wall cpu" in seconds, cpu = user + sys of the
# command and its children (bash's own `time`).
timed() {
  local out=$1; shift
  local TIMEFORMAT='%R %U %S'
  { time "$@" > "$out" 2> "$work/cmd.err"; } 2> "$work/time.txt" || { cat "$work/cmd.err" >&2; return 1; }
  awk '{ printf "%.3f %.3f\n", $1, $2 + $3 }' "$work/time.txt"
}
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { printf "%.3f", v[int((NR + 1) / 2)] }'; }
sum() { printf '%s\n' "$@" | awk '{ s += $1 } END { printf "%.3f", s }'; }
ratio() { awk "BEGIN { printf \"%.2f\", $1 / $2 }"; }
rate() { awk "BEGIN { printf \"%d\", $1 / $2 }"; }
remove_indexes() { rm -f "$home/Maildir/mailreplica-index" "$home/Maildir"/dovecot.index* "$home/Maildir"/dovecot.list.index*; }
fetch_mr() { mr -f tab fetch 'uid guid flags' mailbox INBOX; }
fetch_dv() { dv -f tab fetch 'uid guid flags' mailbox INBOX; }
load() { cut -d' ' -f1-3 /proc/loadavg; }

echo "fetch 'uid guid flags' mailbox INBOX (load $(load)) ..." >&2
# Both tools print the same mails (\Recent aside, which they count differently).
fetch_mr > "$work/mr.out"
fetch_dv > "$work/dv.out"
lines=$(wc -l < "$work/mr.out")
[ "$lines" = $((MESSAGES + 1)) ] || { echo "mailreplica printed $lines lines" >&2; exit 1; }
strip_recent() { sed 's/ \\Recent//; s/\t\\Recent$/\t/; s/\\Recent //' "$1"; }
cmp <(strip_recent "$work/mr.out") <(strip_recent "$work/dv.out") || { echo "the tools printed different mails" >&2; exit 1; }
# First runs: neither tool's index exists; page cache dropped (cold) or not (warm). Three
# rounds, alternating which tool goes first; medians.
declare -A W C
caches="untouched"
for kind in cold warm; do
  for round in 1 2 3; do
    order="mr dv"
    [ $((round % 2)) = 0 ] && order="dv mr"
    for t in $order; do
      remove_indexes
      [ "$kind" = cold ] && caches=$(drop_caches)
      read -r w c < <(timed /dev/null "fetch_$t")
      W[$kind-$t]+="$w "
      C[$kind-$t]+="$c "
    done
  done
done
# Second runs: both indexes exist. Five rounds, alternating.
fetch_mr > /dev/null
fetch_dv > /dev/null
for round in 1 2 3 4 5; do
  for t in mr dv; do
    read -r w c < <(timed /dev/null "fetch_$t")
    W[second-$t]+="$w "
    C[second-$t]+="$c "
  done
done

# Saving: one process per mail, the same mail (a few KB, like the mailbox's) for both tools,
# each tool's default durability. The tools take turns in batches, so that a change in the
# machine's load hits both alike.
mail=$(find "$home/Maildir/cur" -name '*,S=3*' -print -quit)
cp "$mail" "$work/mail.eml"
save_loop() { # tool mailbox count
  if [ "$1" = mr ]; then
    as_user bash -c 'for ((i = 0; i < $3; i++)); do "$1" -c "$2" save -m "$4" < "$5" || exit 1; done' \
      _ "$MR" "$work/mailreplica.toml" "$3" "$2" "$work/mail.eml"
  else
    as_user bash -c 'for ((i = 0; i < $2; i++)); do doveadm -c "$1" save -m "$3" < "$4" || exit 1; done' \
      _ "$work/dovecot.conf" "$3" "$2" "$work/mail.eml"
  fi
}
turns() { # label mailbox-for-mr mailbox-for-dv total batches
  local label=$1 mbox=$2 dbox=$3 total=$4 batches=$5 b w c
  [ "$total" -lt "$batches" ] && batches=$total
  [ $((total % batches)) = 0 ] || { echo "$total mails do not split into $batches batches" >&2; exit 1; }
  for ((b = 0; b < batches; b++)); do
    read -r w c < <(timed /dev/null save_loop mr "$mbox" $((total / batches)))
    W[$label-mr]+="$w "
    C[$label-mr]+="$c "
    read -r w c < <(timed /dev/null save_loop dv "$dbox" $((total / batches)))
    W[$label-dv]+="$w "
    C[$label-dv]+="$c "
  done
}
echo "saving $SAVES mails with each tool into an empty mailbox (load $(load)) ..." >&2
mr mailbox create SaveOurs
dv mailbox create SaveDovecot
turns empty SaveOurs SaveDovecot "$SAVES" 20
for box in SaveOurs SaveDovecot; do
  n=$(dv -f tab mailbox status messages "$box" | tail -1 | cut -f2)
  [ "$n" = "$SAVES" ] || { echo "$box holds $n mails, not $SAVES" >&2; exit 1; }
done
big=$((SAVES / 10))
echo "saving $big mails with each tool into the $MESSAGES-mail INBOX (load $(load)) ..." >&2
turns big INBOX INBOX "$big" 10
n=$(dv -f tab mailbox status messages INBOX | tail -1 | cut -f2)
[ "$n" = $((MESSAGES + 2 * big)) ] || { echo "INBOX holds $n mails, not $((MESSAGES + 2 * big))" >&2; exit 1; }
[ -f "$work/mail.eml" ] || { echo "$work disappeared during the run" >&2; exit 1; }

row() { # label key median|sum [mails]
  local mw dw mc dc
  if [ "$3" = median ]; then
    # shellcheck disable=SC2086
    mw=$(median ${W[$2-mr]}) dw=$(median ${W[$2-dv]}) mc=$(median ${C[$2-mr]}) dc=$(median ${C[$2-dv]})
  else
    # shellcheck disable=SC2086
    mw=$(sum ${W[$2-mr]}) dw=$(sum ${W[$2-dv]}) mc=$(sum ${C[$2-mr]}) dc=$(sum ${C[$2-dv]})
  fi
  printf '| %-46s | %9s | %12s | %5s | %8s | %11s | %5s |\n' \
    "$1" "$mw" "$dw" "$(ratio "$mw" "$dw")" "$mc" "$dc" "$(ratio "$mc" "$dc")"
  if [ -n "${4:-}" ]; then
    printf '| %-46s | %9s | %12s | %5s | %8s | %11s | %5s |\n' \
      "  mails per second (wall)" "$(rate "$4" "$mw")" "$(rate "$4" "$dw")" "$(ratio "$dw" "$mw")" "" "" ""
  fi
}
echo
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GB", $2 / 1048576}' /proc/meminfo) RAM," \
  "$(lscpu | sed -n 's/^Model name: *//p' | head -1); load at the end $(load)"
echo "data: $work on $(df --output=source,fstype "$work" | tail -1 | tr -s ' '), $MESSAGES mails, $size"
echo "cold runs: page cache $caches before each"
echo
echo "| measurement (seconds; ratio = ours / Dovecot)  | ours wall | Dovecot wall | ratio | ours CPU | Dovecot CPU | ratio |"
echo "|------------------------------------------------|-----------|--------------|-------|----------|-------------|-------|"
row "fetch, first run, cold cache (median of 3)" cold median
row "fetch, first run, warm cache (median of 3)" warm median
row "fetch, second run (median of 5)" second median
row "save $SAVES mails into an empty mailbox" empty sum "$SAVES"
row "save $big mails into the $MESSAGES-mail INBOX" big sum "$big"

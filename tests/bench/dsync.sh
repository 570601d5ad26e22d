#!/usr/bin/env bash
# dsync backup benchmark: `doveadm backup` into Dovecot's own `doveadm dsync-server` and into
# `mailreplica dsync-server`, side by side on the same generated data (issue 3, "Speed").
#
#   sudo tests/bench/dsync.sh            10,000 mails (~200 MiB) in 20 mailboxes, 3 rounds
#   sudo MAILS=2000 REPS=1 tests/bench/dsync.sh     a quick look
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
cd "$(dirname "$0")/../.."

die() { echo "dsync.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root: it creates a throw-away user (sudo $0)"
for t in doveadm perl /usr/bin/time useradd userdel runuser; do
  command -v "$t" >/dev/null || die "$t is missing"
done
if [ -z "${MAILREPLICA:-}" ]; then
  cargo build --release --bin mailreplica >&2
  MAILREPLICA=$PWD/target/release/mailreplica
fi
DOVEADM=$(command -v doveadm)

WORK=$(mktemp -d /var/tmp/mrbench.XXXXXX)
USER_NAME=mrbench$$
chmod 755 "$WORK"
cleanup() {
  userdel "$USER_NAME" 2>/dev/null || true
  if [ -z "${KEEP:-}" ]; then rm -rf "$WORK"; else echo "kept $WORK" >&2; fi
}
trap cleanup EXIT
useradd --no-create-home --home-dir "$WORK/home" --shell /usr/sbin/nologin --user-group "$USER_NAME"
mkdir -p "$WORK/home" "$WORK/run" "$WORK/out"
# The binary must be reachable by the user.
cp "$MAILREPLICA" "$WORK/mailreplica"
chmod 755 "$WORK/mailreplica"
chown "$USER_NAME:" "$WORK/home" "$WORK/run" "$WORK/out"
chmod 700 "$WORK/home"
cat >"$WORK/dovecot.conf" <<EOF
protocols =
ssl = no
base_dir = $WORK/run
log_path = /dev/stderr
mail_location = maildir:~/Maildir
first_valid_uid = 100
namespace inbox {
  inbox = yes
}
EOF
printf 'mail_location = "maildir:~/Maildir"\nfirst_valid_uid = 100\n' >"$WORK/mailreplica.toml"
chmod 644 "$WORK/dovecot.conf" "$WORK/mailreplica.toml"

as_user() {
  (cd "$WORK/home" && runuser -u "$USER_NAME" -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    USER="$USER_NAME" HOME="$WORK/home" TZ=UTC LANG=C.UTF-8 "$@")
}
dv() { as_user "$DOVEADM" -c "$WORK/dovecot.conf" "$@"; }

# ---------------------------------------------------------------------------------------------
# The master: BOXES mailboxes (INBOX, a hierarchy, lists), MAILS mails of 1 KiB to 100 KiB
# (log-uniform, ~22 KiB on average), two thirds \Seen, some flagged or with keywords. Written
# as a delivery agent would (files in cur/ with their flags), then indexed by Dovecot.
echo "generating $MAILS mails in $BOXES mailboxes..." >&2
as_user perl -e '
  use strict; use warnings;
  my ($root, $mails, $boxes) = @ARGV;
  my @names = ("INBOX", "Sent", "Drafts", "Trash", "Archive");
  push @names, map { "Archive.$_" } 2015..2024;
  my $i = 0;
  while (@names < $boxes) { push @names, "Lists.list" . $i++ }
  splice @names, $boxes;
  my $seed = 12345;
  my $rand = sub { $seed = ($seed * 1103515245 + 12345) % 2147483648; $seed / 2147483648 };
  my @words = map { join "", map { chr(97 + int($rand->() * 26)) } 1 .. (2 + $_ % 9) } 1 .. 2000;
  mkdir $root, 0700;
  for my $b (@names) {
    my $d = $b eq "INBOX" ? $root : "$root/.$b";
    mkdir $d, 0700; mkdir "$d/$_", 0700 for qw(cur new tmp);
    if ($b ne "INBOX") { open my $f, ">", "$d/maildirfolder" or die; close $f }
    open my $k, ">", "$d/dovecot-keywords" or die; print $k "0 \$Forwarded\n1 Work\n"; close $k;
  }
  open my $s, ">", "$root/subscriptions" or die;
  print $s "$_\n" for grep { $_ ne "INBOX" } @names;
  close $s;
  for my $n (1 .. $mails) {
    # INBOX takes a quarter, the rest is spread over the other mailboxes.
    my $b = $rand->() < 0.25 ? "INBOX" : $names[1 + int($rand->() * (@names - 1))];
    my $d = $b eq "INBOX" ? $root : "$root/.$b";
    my $size = int(exp(log(1024) + $rand->() * (log(102400) - log(1024))));
    my $body = "From: sender$n\@example.org\nTo: user\@example.org\nSubject: mail $n "
      . join(" ", map { $words[int($rand->() * @words)] } 1 .. 6)
      . "\nMessage-ID: <$n.bench\@example.org>\nDate: Thu, 01 Jan 2026 00:00:00 +0000\n\n";
    my $line = "";
    while (length($body) < $size) {
      $line .= $words[int($rand->() * @words)] . " ";
      if (length($line) > 70) { $body .= "$line\n"; $line = "" }
    }
    my $flags = "";
    $flags .= "a" if $rand->() < 0.05;    # $Forwarded
    $flags .= "b" if $rand->() < 0.05;    # Work
    $flags .= "F" if $rand->() < 0.05;
    $flags .= "R" if $rand->() < 0.1;
    $flags .= "S" if $rand->() < 0.66;
    my $vsize = length($body) + ($body =~ tr/\n//);
    my $name = sprintf("%d.M%dP1.bench,S=%d,W=%d:2,%s", 1700000000 + $n, $n, length($body), $vsize, $flags);
    open my $f, ">", "$d/cur/$name" or die "$d/cur/$name: $!";
    print $f $body;
    close $f;
    utime 1700000000 + $n, 1700000000 + $n, "$d/cur/$name";
  }
' "$WORK/home/Maildir" "$MAILS" "$BOXES"
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
  if ! as_user /usr/bin/time -f %e -o "$wall" "$DOVEADM" -c "$WORK/dovecot.conf" backup \
    "$(slave_cmd "$slave" "$dest" "$rss")" 2>"$WORK/out/$tag.log"; then
    cat "$WORK/out/$tag.log" >&2
    die "backup into $slave failed ($tag)"
  fi
  grep -q . "$WORK/out/$tag.log" && { echo "--- $tag logged:" >&2; head -20 "$WORK/out/$tag.log" >&2; }
  echo "$(cat "$wall") $(tail -1 "$rss")"
}
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
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
declare -A wall rss cpu
record() {
  local phase=$1 s=$2 r=$3 w x m cu cs
  read -r w x < <(run_backup "$s" "$s-replica" "$phase-$s-$r")
  IFS=_ read -r m cu cs <<<"$x"
  wall[$phase-$s]+="$w "
  rss[$phase-$s]+="$m "
  cpu[$phase-$s]+="$(awk -v u="$cu" -v s="$cs" 'BEGIN { print u + s }') "
  echo "$phase round $r $s: ${w}s, slave CPU ${cu}s user ${cs}s sys, peak RSS $((m / 1024)) MiB" >&2
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
echo "| phase | doveadm dsync-server | mailreplica dsync-server | ratio (ours / Dovecot's) | slave CPU: Dovecot's / ours | slave peak RSS: Dovecot's / ours |"
echo "|---|---:|---:|---:|---:|---:|"
for phase in full incremental; do
  med() { tr ' ' '\n' <<<"$1" | grep . | median; }
  low() { tr ' ' '\n' <<<"$1" | grep . | sort -n | head -1; }
  d=$(med "${wall[$phase-dovecot]}")
  o=$(med "${wall[$phase-ours]}")
  dl=$(low "${wall[$phase-dovecot]}")
  ol=$(low "${wall[$phase-ours]}")
  dc=$(med "${cpu[$phase-dovecot]}")
  oc=$(med "${cpu[$phase-ours]}")
  dr=$(tr ' ' '\n' <<<"${rss[$phase-dovecot]}" | grep . | sort -n | tail -1)
  or=$(tr ' ' '\n' <<<"${rss[$phase-ours]}" | grep . | sort -n | tail -1)
  awk -v p="$phase" -v d="$d" -v o="$o" -v dl="$dl" -v ol="$ol" -v dc="$dc" -v oc="$oc" -v dr="$dr" -v or="$or" \
    'BEGIN { printf "| %s | %.2f s (min %.2f) | %.2f s (min %.2f) | %.2f (min/min %.2f) | %.2f s / %.2f s | %.1f MiB / %.1f MiB |\n",
             p, d, dl, o, ol, o / d, ol / dl, dc, oc, dr / 1024, or / 1024 }'
done

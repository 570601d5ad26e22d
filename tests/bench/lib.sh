# Shared by the dsync benchmarks (sourced, not run): a throw-away user with a sandbox directory
# under /var/tmp, doveadm's and our configuration, and small helpers.
#
#   bench_setup NAME PREFIX LOCATION [TOOL...]
#       NAME: the script's name for messages; PREFIX: of the sandbox directory and the user;
#       LOCATION: the default mail_location of both tools (e.g. maildir:~/Maildir); TOOLs that
#       must be installed besides doveadm, perl, /usr/bin/time, useradd, userdel and runuser.
#       Sets WORK, USER_NAME, DOVEADM and MAILREPLICA (built with `cargo build --release`
#       unless set), removes the user and (unless KEEP is set) the directory at exit.
#   as_user CMD...       runs CMD as the user, in its home, with a clean environment
#   wall_clock FILE CMD...  runs CMD, writes its wall time in seconds (to the millisecond) to
#                        FILE, returns its exit code (/usr/bin/time's %e has 10 ms steps)
#   generate ROOT MAILS BOXES [MIN MAX]     writes a Maildir (tests/bench/gen-maildir.pl)
#   median               the median of the numbers on stdin
#   bench_record KEY WALL RSS_USER_SYS      keeps one timed run (KEY: PHASE-SLAVE)
#   bench_table FIRST-COLUMN PHASE...       prints the Markdown table of the kept runs
#   die MESSAGE

die() { echo "${BENCH_NAME:-bench}: $*" >&2; exit 1; }

bench_setup() {
  BENCH_NAME=$1
  local prefix=$2 location=$3 t
  shift 3
  [ "$(id -u)" = 0 ] || die "run as root: it creates a throw-away user (sudo $0)"
  for t in doveadm perl /usr/bin/time useradd userdel runuser "$@"; do
    command -v "$t" >/dev/null || die "$t is missing"
  done
  if [ -z "${MAILREPLICA:-}" ]; then
    cargo build --release --bin mailreplica >&2
    MAILREPLICA=$PWD/target/release/mailreplica
  fi
  DOVEADM=$(command -v doveadm)
  WORK=$(mktemp -d "/var/tmp/$prefix.XXXXXX")
  USER_NAME=$prefix$$
  chmod 755 "$WORK"
  trap bench_cleanup EXIT
  useradd --no-create-home --home-dir "$WORK/home" --shell /usr/sbin/nologin --user-group "$USER_NAME"
  mkdir -p "$WORK/home" "$WORK/run" "$WORK/out"
  # Everything the user runs must be reachable by it.
  cp "$MAILREPLICA" "$WORK/mailreplica"
  cp "$(dirname "${BASH_SOURCE[0]}")/gen-maildir.pl" "$WORK/gen-maildir.pl"
  chmod 755 "$WORK/mailreplica"
  chmod 644 "$WORK/gen-maildir.pl"
  chown "$USER_NAME:" "$WORK/home" "$WORK/run" "$WORK/out"
  chmod 700 "$WORK/home"
  cat >"$WORK/dovecot.conf" <<EOF
protocols =
ssl = no
base_dir = $WORK/run
log_path = /dev/stderr
mail_location = $location
first_valid_uid = 100
namespace inbox {
  inbox = yes
}
EOF
  printf 'mail_location = "%s"\nfirst_valid_uid = 100\n' "$location" >"$WORK/mailreplica.toml"
  chmod 644 "$WORK/dovecot.conf" "$WORK/mailreplica.toml"
}

bench_cleanup() {
  userdel "$USER_NAME" 2>/dev/null || true
  if [ -z "${KEEP:-}" ]; then rm -rf "$WORK"; else echo "kept $WORK" >&2; fi
}

as_user() {
  (cd "$WORK/home" && runuser -u "$USER_NAME" -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    USER="$USER_NAME" HOME="$WORK/home" TZ=UTC LANG=C.UTF-8 "$@")
}

wall_clock() {
  local file=$1 t0 t1 rc=0
  shift
  t0=$(date +%s%N)
  "$@" || rc=$?
  t1=$(date +%s%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", (b - a) / 1e9 }' >"$file"
  return $rc
}

generate() {
  echo "generating $2 mails in $3 mailboxes..." >&2
  as_user perl "$WORK/gen-maildir.pl" "$@"
}

median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# Timed runs, by "PHASE-SLAVE" (SLAVE: dovecot or ours): wall seconds, the slave's peak RSS
# (KiB) and CPU seconds, space-separated.
declare -A bench_wall bench_rss bench_cpu
bench_record() {
  local key=$1 w=$2 m cu cs
  IFS=_ read -r m cu cs <<<"$3"
  bench_wall[$key]+="$w "
  bench_rss[$key]+="$m "
  bench_cpu[$key]+="$(awk -v u="$cu" -v s="$cs" 'BEGIN { print u + s }') "
  echo "$key: ${w}s, slave CPU ${cu}s user ${cs}s sys, peak RSS $((m / 1024)) MiB" >&2
}

bench_table() {
  local first=$1 phase d o dl ol dc oc dr or
  shift
  med() { tr ' ' '\n' <<<"$1" | grep . | median; }
  low() { tr ' ' '\n' <<<"$1" | grep . | sort -n | head -1; }
  high() { tr ' ' '\n' <<<"$1" | grep . | sort -n | tail -1; }
  echo "| $first | with doveadm dsync-server | with mailreplica dsync-server | ratio (ours / Dovecot's) | slave CPU: Dovecot's / ours | slave peak RSS: Dovecot's / ours |"
  echo "|---|---:|---:|---:|---:|---:|"
  for phase in "$@"; do
    d=$(med "${bench_wall[$phase-dovecot]}")
    o=$(med "${bench_wall[$phase-ours]}")
    dl=$(low "${bench_wall[$phase-dovecot]}")
    ol=$(low "${bench_wall[$phase-ours]}")
    dc=$(med "${bench_cpu[$phase-dovecot]}")
    oc=$(med "${bench_cpu[$phase-ours]}")
    dr=$(high "${bench_rss[$phase-dovecot]}")
    or=$(high "${bench_rss[$phase-ours]}")
    awk -v p="$phase" -v d="$d" -v o="$o" -v dl="$dl" -v ol="$ol" -v dc="$dc" -v oc="$oc" -v dr="$dr" -v or="$or" \
      'BEGIN { printf "| %s | %.3f s (min %.3f) | %.3f s (min %.3f) | %.2f (min/min %.2f) | %.2f s / %.2f s | %.1f MiB / %.1f MiB |\n",
               p, d, dl, o, ol, o / d, ol / dl, dc, oc, dr / 1024, or / 1024 }'
  done
}

#!/usr/bin/env bash
# Installs mailreplica-wrapper as root's SSH forced command and checks its policy file.
#
#   deploy/install-wrapper.sh [--binary PATH] [--bindir DIR] [--policy PATH] [--auth-log PATH]
#
# Defaults: --binary target/release/mailreplica-wrapper, --bindir /usr/local/sbin,
# --policy /etc/mailreplica/wrapper.toml. Installs the binary owned by root, mode 0755
# (atomically, by rename), then checks that the binary's directories, the policy file and every
# directory above it are owned by root and not writable by group or others — the same rule
# the wrapper enforces at run time — and that the wrapper itself accepts the policy.
# Needs root. Changes nothing else: sshd_config and authorized_keys are yours to edit
# (see deploy/sshd_config.mailreplica-wrapper.conf and deploy/authorized_keys.example).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
binary="$here/../target/release/mailreplica-wrapper"
bindir=/usr/local/sbin
policy=/etc/mailreplica/wrapper.toml
log_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --bindir) bindir="$2"; shift 2 ;;
    --policy) policy="$2"; shift 2 ;;
    --auth-log) log_args=(--auth-log "$2"); shift 2 ;;
    *) echo "install-wrapper.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

die() { echo "install-wrapper.sh: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"
[ -f "$binary" ] || die "$binary not found (cargo build --release -p mailreplica-wrapper)"
case "$bindir$policy" in *[!A-Za-z0-9_./-]*) die "paths must be plain (letters, digits, _ . / -)" ;; esac
case "$policy" in /*) ;; *) die "--policy needs an absolute path" ;; esac

# Owned by root and not writable by group or others, for PATH and every directory above it.
check_root_only() {
  local p
  p="$(readlink -f -- "$1")" || die "$1: cannot resolve"
  while :; do
    [ -e "$p" ] || die "$p does not exist"
    local owner mode
    owner="$(stat -c %u -- "$p")"
    mode="$(stat -c %a -- "$p")"
    [ "$owner" = 0 ] || die "$p is owned by uid $owner, not root"
    # group-write (020) or other-write (002) bits
    (( (8#$mode & 8#022) == 0 )) || die "$p is writable by group or others (mode $mode)"
    [ "$p" = / ] && break
    p="$(dirname -- "$p")"
  done
}

check_root_only "$bindir"
tmp="$(mktemp "$bindir/.mailreplica-wrapper.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
install -o root -g root -m 0755 "$binary" "$tmp"
mv -f "$tmp" "$bindir/mailreplica-wrapper"
trap - EXIT
check_root_only "$bindir/mailreplica-wrapper"
echo "installed $bindir/mailreplica-wrapper (root:root 0755)"

if [ ! -e "$policy" ]; then
  die "no policy at $policy: start from deploy/wrapper.toml.example
  (install -o root -g root -m 0644 deploy/wrapper.toml.example $policy), then run this again"
fi
[ -f "$policy" ] && [ ! -L "$policy" ] || die "$policy must be a regular file, not a symlink"
check_root_only "$policy"
# The wrapper's own verdict: a policy it cannot parse shows reason=policy-invalid.
if out="$("$bindir/mailreplica-wrapper" --check --policy "$policy" "${log_args[@]}" root 2>&1)"; then :; fi
case "$out" in
  *policy-invalid*|*policy-untrusted*|*bad-arguments*) die "the wrapper refuses $policy: $out" ;;
esac
echo "policy $policy: owner and mode ok, accepted by the wrapper"

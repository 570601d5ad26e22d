#!/usr/bin/env bash
# Makes a Debian 13 (trixie) root with Dovecot 2.4 in DIR, for the tests that run Dovecot 2.4
# on this Debian 12 host (tests/run calls it when DIR is missing). Debian 13's packages come
# from the same mirror as the host's, so this needs no network beyond the host's apt mirror.
#
#   tests/lab/trixie-root.sh /var/lib/mailreplica-tests/trixie
#
# Nothing is mounted in it: the tests enter it with `unshare --mount` + `chroot`, so that
# their mounts (/dev, /proc, the test's sandbox) vanish with their processes.
set -euo pipefail
dir=${1:?usage: trixie-root.sh DIR}
if [ -x "$dir/usr/sbin/dovecot" ]; then
  exit 0
fi
command -v debootstrap >/dev/null 2>&1 || {
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq debootstrap >/dev/null
}
# The host's first mirror (deb822 sources, or a one-line sources.list).
mirror=$(sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
if [ -z "$mirror" ]; then
  mirror=$(awk '$1 == "deb" { print $2; exit }' /etc/apt/sources.list 2>/dev/null)
fi
[ -n "$mirror" ] || { echo "trixie-root.sh: no apt mirror found on this host" >&2; exit 1; }
tmp="$dir.tmp.$$"
rm -rf "$tmp"
mkdir -p "$(dirname "$dir")"
trap 'rm -rf "$tmp"' EXIT
# The packages' services are never started in the root.
debootstrap --variant=minbase --include=dovecot-core,dovecot-imapd trixie "$tmp" "$mirror" >"$tmp.log" 2>&1 || {
  tail -20 "$tmp.log" >&2
  rm -f "$tmp.log"
  exit 1
}
rm -f "$tmp.log"
# A clean, offline root: no apt caches.
rm -rf "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/*
mv "$tmp" "$dir"
trap - EXIT
echo "trixie-root.sh: Dovecot $(chroot "$dir" dovecot --version 2>/dev/null || echo '?') in $dir" >&2

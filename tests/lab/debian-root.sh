#!/usr/bin/env bash
# Makes a minimal Debian root of SUITE in DIR with PACKAGES, for the tests that need another
# Debian than the host's (tests/run calls it when DIR is missing): Debian 13 (trixie) with
# Dovecot 2.4 on this Debian 12 host, and a clean Debian 12 (bookworm) to install our package
# into. Every suite comes from the host's own apt mirror: no other network.
#
#   tests/lab/debian-root.sh trixie   /var/lib/mailreplica-tests/trixie   dovecot-core,dovecot-imapd
#   tests/lab/debian-root.sh bookworm /var/lib/mailreplica-tests/bookworm man-db
#
# Nothing is mounted in it: the tests enter it with `unshare --mount` + `chroot`, so that
# their mounts (/dev, /proc, the test's sandbox) vanish with their processes. A root made
# already with the same suite and packages (recorded in its /.mailreplica-root) is left as it
# is; one made with others is made again.
set -euo pipefail
suite=${1:?usage: debian-root.sh SUITE DIR [PACKAGES]}
dir=${2:?usage: debian-root.sh SUITE DIR [PACKAGES]}
packages=${3:-}
if [ -f "$dir/etc/debian_version" ] && [ "$(cat "$dir/.mailreplica-root" 2>/dev/null)" = "$suite $packages" ]; then
  exit 0
fi
rm -rf "$dir"
command -v debootstrap >/dev/null 2>&1 || {
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq debootstrap >/dev/null
}
# The host's first mirror (deb822 sources, or a one-line sources.list).
mirror=$(sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
if [ -z "$mirror" ]; then
  mirror=$(awk '$1 == "deb" { print $2; exit }' /etc/apt/sources.list 2>/dev/null)
fi
[ -n "$mirror" ] || { echo "debian-root.sh: no apt mirror found on this host" >&2; exit 1; }
tmp="$dir.tmp.$$"
rm -rf "$tmp"
mkdir -p "$(dirname "$dir")"
trap 'rm -rf "$tmp"' EXIT
# The packages' services are never started in the root.
debootstrap --variant=minbase ${packages:+--include=$packages} "$suite" "$tmp" "$mirror" >"$tmp.log" 2>&1 || {
  tail -20 "$tmp.log" >&2
  rm -f "$tmp.log"
  exit 1
}
rm -f "$tmp.log"
# A clean, offline root: no apt caches.
rm -rf "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/*
echo "$suite $packages" > "$tmp/.mailreplica-root"
mv "$tmp" "$dir"
trap - EXIT
echo "debian-root.sh: Debian $(cat "$dir/etc/debian_version") in $dir" >&2

#!/usr/bin/env bash
# Builds the Debian package `mailreplica` from the workspace:
#
#   packaging/build-deb.sh [OUTDIR]        → OUTDIR/mailreplica_VERSION_ARCH.deb (target/debian)
#
# It runs `cargo build --release --workspace` first, unless MAILREPLICA_DEB_PREBUILT=1 says the
# release binaries are there already (the tests build once, then package). The version is the
# workspace's, or MAILREPLICA_DEB_VERSION.
#
# Why a script around dpkg-deb rather than cargo-deb or dpkg-buildpackage: the package is two
# binaries and files they generate themselves (`mailreplica generate` makes the man pages and
# completions from the clap definitions), so every step fits on this page and needs nothing
# beyond dpkg-deb, gzip and strip, which a Debian build host has; cargo-deb would be one more
# tool to install and pin, and a debian/ source package brings debhelper for no gain here.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/debian}
version=${MAILREPLICA_DEB_VERSION:-$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)}
arch=$(dpkg --print-architecture)
[ -n "${MAILREPLICA_DEB_PREBUILT:-}" ] || cargo build --release --workspace
for b in mailreplica mailreplica-wrapper; do
  [ -x "target/release/$b" ] || { echo "build-deb.sh: target/release/$b is missing" >&2; exit 1; }
done

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
chmod 0755 "$root"
umask 022
d() { install -d -m 0755 "$root/$1"; }
strip_to() { strip --strip-unneeded --remove-section=.comment --remove-section=.note -o "$2" "$1"; chmod 0755 "$2"; }

d usr/bin; d usr/sbin
strip_to target/release/mailreplica "$root/usr/bin/mailreplica"
strip_to target/release/mailreplica-wrapper "$root/usr/sbin/mailreplica-wrapper"
mr="$root/usr/bin/mailreplica"

# Configuration: conffiles that replicate nothing until edited.
d etc/mailreplica
install -m 0644 packaging/mailreplica.toml "$root/etc/mailreplica/mailreplica.toml"
install -m 0644 packaging/wrapper.toml "$root/etc/mailreplica/wrapper.toml"

# The replicator's unit, not enabled.
d lib/systemd/system
install -m 0644 deploy/mailreplica-replicator.service "$root/lib/systemd/system/"

# Man pages and completions, made by the binary from its own definitions.
d usr/share/man/man1; d usr/share/man/man5; d usr/share/man/man8
"$mr" generate man | gzip -9n > "$root/usr/share/man/man1/mailreplica.1.gz"
"$mr" generate toml-man | gzip -9n > "$root/usr/share/man/man5/mailreplica.toml.5.gz"
gzip -9n < wrapper/doc/mailreplica-wrapper.8 > "$root/usr/share/man/man8/mailreplica-wrapper.8.gz"
d usr/share/bash-completion/completions; d usr/share/zsh/vendor-completions; d usr/share/fish/vendor_completions.d
"$mr" generate bash > "$root/usr/share/bash-completion/completions/mailreplica"
"$mr" generate zsh > "$root/usr/share/zsh/vendor-completions/_mailreplica"
"$mr" generate fish > "$root/usr/share/fish/vendor_completions.d/mailreplica.fish"

# Documentation and examples.
doc=usr/share/doc/mailreplica
d "$doc"; d "$doc/examples"
install -m 0644 packaging/copyright "$root/$doc/copyright"
gzip -9n < README.md > "$root/$doc/README.md.gz"
gzip -9n < BENCHMARKS.md > "$root/$doc/BENCHMARKS.md.gz"
for f in deploy/*; do
  install -m 0644 "$f" "$root/$doc/examples/"
done
date=$(date -R -d "@$(git log -1 --format=%ct 2>/dev/null || date +%s)")
printf 'mailreplica (%s) unstable; urgency=medium\n\n  * Built from the mailreplica workspace (%s).\n\n -- mailreplica maintainers <mailreplica@example.invalid>  %s\n' \
  "$version" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" "$date" | gzip -9n > "$root/$doc/changelog.gz"

# Control files.
d DEBIAN
glibc=$(objdump -T "$root/usr/bin/mailreplica" "$root/usr/sbin/mailreplica-wrapper" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CONTROL
Package: mailreplica
Version: $version
Architecture: $arch
Maintainer: mailreplica maintainers <mailreplica@example.invalid>
Installed-Size: $size
Depends: libc6 (>= $glibc), libgcc-s1 (>= 4.2)
Suggests: dovecot-core, openssh-server
Section: mail
Priority: optional
Homepage: https://example.invalid/mailreplica
Description: replicate Dovecot Maildirs user by user with dsync
 mailreplica replicates mail between servers with Dovecot's own dsync
 protocol (3.5), for sites whose mail users have many different Unix UIDs.
 .
 It contains mailreplica, the sender (sync, backup, and the replicator
 service with its systemd unit, not enabled), and mailreplica-wrapper, the
 command forced on root's SSH key on a replica, which checks the user
 against a policy and drops every privilege before it serves dsync.
CONTROL
printf '/etc/mailreplica/mailreplica.toml\n/etc/mailreplica/wrapper.toml\n' > "$root/DEBIAN/conffiles"
for s in postinst prerm postrm; do
  install -m 0755 "packaging/$s" "$root/DEBIAN/$s"
done
(cd "$root" && find . -type f ! -path './DEBIAN/*' ! -path './etc/*' -printf '%P\0' | sort -z | xargs -0 md5sum) > "$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/conffiles" "$root/DEBIAN/md5sums"

mkdir -p "$out"
deb="$out/mailreplica_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"

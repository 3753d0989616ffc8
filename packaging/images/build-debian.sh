#!/usr/bin/env bash
# Build a Debian 12 (bookworm) sandbox image with one language runtime, as a
# read-only erofs disk: `python` (python3) or `node` (nodejs). These back the
# microsandbox SDKs' default images (`microsandbox/python`,
# `microsandbox/node`) on machines without registry access.
#
# Usage: packaging/images/build-debian.sh python|node   (prints the image path)
# Cached under $MOAT_CACHE (default /var/cache/moat)/images/<lang>-<key>.erofs,
# keyed by this script; takes 2-4 minutes the first time.
set -euo pipefail
lang=${1:?usage: build-debian.sh python|node}
here=$(cd "$(dirname "$0")" && pwd)
cache=${MOAT_CACHE:-/var/cache/moat}
case "$lang" in
  python) pkgs=python3 ;;
  node) pkgs=nodejs ;;
  *) echo "image: unknown language $lang (python|node)" >&2; exit 2 ;;
esac
for tool in debootstrap mkfs.erofs; do
  command -v "$tool" >/dev/null || { echo "image: $tool missing: apt-get install debootstrap erofs-utils" >&2; exit 1; }
done
key=$(sha256sum "$here/build-debian.sh" | cut -c1-16)
out="$cache/images/$lang-$key.erofs"
if [ -f "$out" ]; then
  echo "image: cached $out" >&2
  echo "$out"; exit 0
fi
mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
mirror=${mirror:-http://deb.debian.org/debian}
echo "image: building $lang image (debootstrap bookworm + $pkgs from $mirror; 2-4 min)" >&2
mkdir -p "$cache/images"
root=$(mktemp -d "${TMPDIR:-/tmp}/moat-$lang.XXXXXX")
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include="$pkgs" bookworm "$root" "$mirror" > "$root.log" 2>&1 || {
  tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/* \
  "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
mkdir -p "$root/workspace"
echo "moat" > "$root/etc/hostname"
mkfs.erofs --quiet --all-root -T0 "$out.tmp" "$root" >&2
mv "$out.tmp" "$out"
chmod 0644 "$out"
echo "image: built $out ($(du -h "$out" | cut -f1))" >&2
echo "$out"

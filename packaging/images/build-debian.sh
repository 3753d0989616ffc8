#!/usr/bin/env bash
# Build a Debian 12 (bookworm) root filesystem with one language runtime,
# `python` (python3) or `node` (nodejs), as a tarball (numeric owners, no
# device nodes). `oci-layout.sh` turns it into an OCI image that setup
# imports as `microsandbox/python` / `microsandbox/node`, the microsandbox
# SDKs' default images, on machines without registry access.
#
# Usage: packaging/images/build-debian.sh python|node   (prints the tar path)
# Cached under $MOAT_CACHE (default /var/cache/moat)/images/<lang>-<key>.tar,
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
command -v debootstrap >/dev/null || { echo "image: debootstrap missing: apt-get install debootstrap" >&2; exit 1; }
key=$(sha256sum "$here/build-debian.sh" | cut -c1-16)
out="$cache/images/$lang-$key.tar"
if [ -f "$out" ]; then
  echo "image: cached $out" >&2
  echo "$out"; exit 0
fi
mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
mirror=${mirror:-http://deb.debian.org/debian}
echo "image: building $lang rootfs (debootstrap bookworm + $pkgs from $mirror; 2-4 min)" >&2
mkdir -p "$cache/images"
root=$(mktemp -d "${TMPDIR:-/tmp}/moat-$lang.XXXXXX")
trap 'rm -rf "$root" "$root.log"' EXIT
debootstrap --variant=minbase --include="$pkgs" bookworm "$root" "$mirror" > "$root.log" 2>&1 || {
  tail -20 "$root.log" >&2; exit 1; }
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/* \
  "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
mkdir -p "$root/workspace"
echo "moat" > "$root/etc/hostname"
# Images carry no device nodes (the guest kernel provides /dev) and nothing
# in the kernel's filesystems.
find "$root/dev" "$root/proc" "$root/sys" -mindepth 1 -delete 2>/dev/null || true
tar --numeric-owner --sort=name --mtime=@0 --xattrs -C "$root" -cf "$out.tmp" .
mv "$out.tmp" "$out"
chmod 0644 "$out"
echo "image: built $out ($(du -h "$out" | cut -f1))" >&2
echo "$out"

#!/usr/bin/env bash
# Build the "base" sandbox image: a minimal root filesystem from Debian's
# busybox-static (a shell and the usual tools), as a read-only erofs disk.
# The OCI image store replaces this for real images; this one needs no
# registry and boots in tests.
#
# Usage: packaging/images/build-base.sh   (prints the image path on stdout)
# Cached under $MOAT_CACHE (default /var/cache/moat)/images/base-<key>.erofs,
# keyed by the busybox package version and this script.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${MOAT_CACHE:-/var/cache/moat}
bb=/bin/busybox
[ -x "$bb" ] || { echo "image: $bb missing: apt-get install busybox-static" >&2; exit 1; }
command -v mkfs.erofs >/dev/null || { echo "image: mkfs.erofs missing: apt-get install erofs-utils" >&2; exit 1; }
ver=$(dpkg-query -W -f='${Version}' busybox-static)
key=$( { echo "$ver"; cat "$here/build-base.sh"; } | sha256sum | cut -c1-16)
out="$cache/images/base-$key.erofs"
if [ -f "$out" ]; then
  echo "image: cached $out" >&2
  echo "$out"; exit 0
fi
echo "image: building base image (busybox-static $ver)" >&2
mkdir -p "$cache/images"
root=$(mktemp -d "${TMPDIR:-/tmp}/moat-base.XXXXXX")
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,root,tmp,proc,sys,dev,run,var/tmp,home,workspace}
chmod 1777 "$root/tmp" "$root/var/tmp"
chmod 0700 "$root/root"
cp "$bb" "$root/bin/busybox"
# One symlink per applet, at the path busybox lists for it.
"$bb" --list-full | while read -r applet; do
  case "$applet" in bin/busybox|"") continue;; esac
  [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done
cat > "$root/etc/passwd" <<'P'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
P
cat > "$root/etc/group" <<'G'
root:x:0:
nogroup:x:65534:
G
echo "moat" > "$root/etc/hostname"
printf 'NAME="moat base"\nID=moat-base\nVERSION_ID=%s\n' "$ver" > "$root/etc/os-release"
mkfs.erofs --quiet --all-root -T0 "$out.tmp" "$root" >&2
mv "$out.tmp" "$out"
chmod 0644 "$out"
echo "image: built $out ($(du -h "$out" | cut -f1))" >&2
echo "$out"

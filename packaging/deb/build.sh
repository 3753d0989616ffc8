#!/bin/bash
# Builds the moat Debian package from this workspace: stages `make install`
# (PREFIX=/usr, SYSCONFDIR=/etc) and adds the package metadata and
# maintainer scripts in this directory. Needs the release build and the
# guest artefacts (`make setup`). Prints the path of the .deb.
#   packaging/deb/build.sh [OUTDIR]     (default: target/deb)
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:-$top/target/deb}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$top/Cargo.toml" | head -1)
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
chmod 0755 "$stage"   # the package's "./" entry

make -s -C "$top" install DESTDIR="$stage" PREFIX=/usr SYSCONFDIR=/etc >&2
install -d "$stage/DEBIAN"
for s in postinst prerm postrm; do
  install -m 0755 "$top/packaging/deb/$s" "$stage/DEBIAN/$s"
done
printf '/etc/moat/broker.toml\n/etc/moat/gateway.toml\n' > "$stage/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
  "$top/packaging/deb/control" > "$stage/DEBIAN/control"
mkdir -p "$out"
deb="$out/moat_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zgzip --build "$stage" "$deb" >&2
echo "$deb"

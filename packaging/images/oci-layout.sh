#!/usr/bin/env bash
# Wrap a root filesystem tarball into a one-layer OCI image layout (what
# `moat image import` reads), without Docker or registry access.
#
# Usage: packaging/images/oci-layout.sh ROOTFS.tar OUT_DIR [KEY=VALUE ENV]...
# The layer is the tarball itself (uncompressed: fast to import); the config
# is linux/amd64 with the given Env; index.json tags it `latest`. Prints
# OUT_DIR. Rebuilt only when the tarball or this script changes.
set -euo pipefail
tar=${1:?usage: oci-layout.sh ROOTFS.tar OUT_DIR [ENV]...}
out=${2:?usage: oci-layout.sh ROOTFS.tar OUT_DIR [ENV]...}
shift 2
here=$(cd "$(dirname "$0")" && pwd)
stamp="$(sha256sum "$here/oci-layout.sh" | cut -c1-16) $(stat -c '%s %Y' "$tar") $*"
if [ -f "$out/.moat-stamp" ] && [ "$(cat "$out/.moat-stamp")" = "$stamp" ]; then
  echo "$out"; exit 0
fi
rm -rf "$out.tmp"
mkdir -p "$out.tmp/blobs/sha256"
blob() { # FILE MEDIA_TYPE -> writes the blob, prints a descriptor
  local d size
  d=$(sha256sum "$1" | cut -d' ' -f1)
  size=$(stat -c %s "$1")
  mv "$1" "$out.tmp/blobs/sha256/$d"
  printf '{"mediaType":"%s","digest":"sha256:%s","size":%s}' "$2" "$d" "$size"
}
layer_digest=$(sha256sum "$tar" | cut -d' ' -f1)
cp "$tar" "$out.tmp/layer"
layer=$(blob "$out.tmp/layer" application/vnd.oci.image.layer.v1.tar)
env_json=$(printf '"%s",' "$@" | sed 's/,$//')
printf '{"architecture":"amd64","os":"linux","config":{"Env":[%s]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
  "$env_json" "$layer_digest" > "$out.tmp/config"
config=$(blob "$out.tmp/config" application/vnd.oci.image.config.v1+json)
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":%s,"layers":[%s]}' \
  "$config" "$layer" > "$out.tmp/manifest"
manifest=$(blob "$out.tmp/manifest" application/vnd.oci.image.manifest.v1+json)
manifest=${manifest%\}}',"annotations":{"org.opencontainers.image.ref.name":"latest"}}'
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[%s]}' "$manifest" > "$out.tmp/index.json"
printf '{"imageLayoutVersion":"1.0.0"}' > "$out.tmp/oci-layout"
echo "$stamp" > "$out.tmp/.moat-stamp"
rm -rf "$out"
mv "$out.tmp" "$out"
echo "$out"

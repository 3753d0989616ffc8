#!/usr/bin/env bash
# Build the moat guest kernel (PVH ELF vmlinux) from Debian's linux-source-6.1.
#
# Usage: packaging/kernel/build.sh [OUT]
#   Prints the path of the cached vmlinux on stdout (and copies it to OUT if given).
#
# The result is cached under $MOAT_CACHE (default /var/cache/moat)/kernel/<key>/
# where <key> hashes the source tarball's package version, the fragment and this
# script, so a second run with the same inputs returns at once.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${MOAT_CACHE:-/var/cache/moat}
src_tar=/usr/src/linux-source-6.1.tar.xz
[ -f "$src_tar" ] || { echo "kernel: $src_tar missing: apt-get install linux-source-6.1" >&2; exit 1; }
src_ver=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$( { echo "$src_ver"; cat "$here/moat.config" "$here/build.sh"; } | sha256sum | cut -c1-16)
dir="$cache/kernel/$key"
if [ -f "$dir/vmlinux" ]; then
  echo "kernel: cached $dir/vmlinux (linux-source $src_ver)" >&2
else
  echo "kernel: building guest kernel (linux-source $src_ver, key $key); this takes ~7 min on 2 cores" >&2
  work=$(mktemp -d "${TMPDIR:-/tmp}/moat-kernel.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  tar -C "$work" -xf "$src_tar"
  ksrc="$work/linux-source-6.1"
  out="$work/out"; mkdir -p "$out"
  make -s -C "$ksrc" O="$out" ARCH=x86_64 tinyconfig >/dev/null
  (cd "$out" && KCONFIG_CONFIG=.config "$ksrc/scripts/kconfig/merge_config.sh" -m -O "$out" .config "$here/moat.config" >/dev/null)
  make -s -C "$ksrc" O="$out" ARCH=x86_64 olddefconfig >/dev/null
  # Fail loudly if a requested option (on or off) did not survive olddefconfig.
  missing=0
  while IFS= read -r line; do
    case "$line" in
      CONFIG_*=y) opt=${line%%=*}
        grep -qx "$opt=y" "$out/.config" || { echo "kernel: $opt requested but not set after olddefconfig" >&2; missing=1; } ;;
      "# CONFIG_"*" is not set") opt=${line#\# }; opt=${opt%% *}
        if grep -q "^$opt=" "$out/.config"; then echo "kernel: $opt asked off but set after olddefconfig" >&2; missing=1; fi ;;
    esac
  done < "$here/moat.config"
  [ "$missing" = 0 ] || exit 1
  jobs=$(nproc)
  start=$(date +%s)
  make -C "$ksrc" O="$out" ARCH=x86_64 -j"$jobs" vmlinux 2>&1 | while IFS= read -r l; do
    case "$l" in *CC*|*LD*|*AR*) n=$((${n:-0}+1)); [ $((n % 200)) = 0 ] && echo "kernel: ... $n objects ($(( $(date +%s) - start ))s)" >&2;; *error*|*Error*) echo "$l" >&2;; esac
  done
  [ -f "$out/vmlinux" ] || { echo "kernel: build failed" >&2; exit 1; }
  mkdir -p "$dir.tmp"
  cp "$out/vmlinux" "$dir.tmp/vmlinux"
  strip --strip-debug "$dir.tmp/vmlinux" 2>/dev/null || true
  cp "$out/.config" "$dir.tmp/config"
  make -s -C "$ksrc" O="$out" ARCH=x86_64 kernelrelease > "$dir.tmp/release"
  rm -rf "$dir"; mv "$dir.tmp" "$dir"
  echo "kernel: built in $(( $(date +%s) - start ))s -> $dir/vmlinux" >&2
fi
if [ $# -ge 1 ]; then cp "$dir/vmlinux" "$1"; fi
echo "$dir/vmlinux"

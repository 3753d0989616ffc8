#!/usr/bin/env bash
# One-time host set-up for building, running and testing moat on Debian 12:
# system packages, the unprivileged `moat` user the gateway runs as, the
# guest kernel, the static guest agent, the base image, and a broker config
# for development at build/broker.toml. Idempotent; long steps are cached
# under /var/cache/moat.
#
# Usage: packaging/dev/setup.sh [debug|release]   (cargo profile of the host binaries)
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
profile=${1:-release}
cd "$top"
step() { echo "==> $*" >&2; }

pkgs=(linux-source-6.1 qemu-system-x86 busybox-static erofs-utils e2fsprogs cpio bc flex bison
      libelf-dev libssl-dev xz-utils libc6-dev gcc make debootstrap file
      docker-registry skopeo umoci apache2-utils nftables conntrack iproute2 curl systemd
      nginx openssl systemd-container)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "installing system packages: ${missing[*]}"
  [ "$(id -u)" = 0 ] || { echo "setup: run as root to install packages" >&2; exit 1; }
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

if ! getent passwd moat >/dev/null; then
  step "creating system user 'moat' (the gateway runs as it)"
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin moat
fi

step "guest kernel (cached; first build ~7 min on 2 cores)"
kernel=$(packaging/kernel/build.sh)
step "base image"
image=$(packaging/images/build-base.sh)
step "python and node root filesystems (Debian bookworm; cached, 2-4 min each the first time)"
python_rootfs=$(packaging/images/build-debian.sh python)
node_rootfs=$(packaging/images/build-debian.sh node)
step "Debian root with systemd for the package test (cached; 1-4 min the first time)"
tests/fixtures/systemd-root.sh >/dev/null

step "static guest agent"
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --locked -q -p moat-guest --target x86_64-unknown-linux-gnu
agent="$top/target/x86_64-unknown-linux-gnu/release/moat-agent"
file -b "$agent" 2>/dev/null | grep -q "static" || ldd "$agent" 2>&1 | grep -q "not a dynamic" \
  || { echo "setup: $agent is not statically linked" >&2; exit 1; }

step "host binaries ($profile)"
if [ "$profile" = release ]; then
  cargo build --release --locked -q -p moat-cli -p moat-broker -p moat-jailer -p moat-vmm -p moat-gateway
else
  cargo build --locked -q -p moat-cli -p moat-broker -p moat-jailer -p moat-vmm -p moat-gateway
fi

mkdir -p build
install -m 0644 "$kernel" build/vmlinux
install -m 0644 "$(dirname "$kernel")/release" build/kernel.release
install -m 0755 "$agent" build/moat-agent
install -m 0644 "$image" build/base.erofs
rm -f build/python.erofs build/node.erofs
# The image store (content-addressed, safe to share and keep): dev and the
# test suites use it; the default images are imported into it below.
cache_dir=${MOAT_CACHE:-/var/cache/moat}
store=$cache_dir/store
mkdir -p "$store"
ln -sfn "$store" build/store
uid=$(id -u moat); gid=$(id -g moat)
cat > build/broker.toml <<CONF
# Development broker config written by packaging/dev/setup.sh.
socket = "/run/moat/broker.sock"
gateway_uid = $uid
gateway_gid = $gid
state_dir = "/var/lib/moat"

[boot]
kernel = "$top/build/vmlinux"
agent = "$top/build/moat-agent"

[images]
default = "base"
store = "$store"

[images.local]
base = "$top/build/base.erofs"
CONF

step "default images microsandbox/python and microsandbox/node (OCI layouts, imported into $store)"
path_env="PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
for lang in python node; do
  rootfs_var="${lang}_rootfs"
  layout=$(packaging/images/oci-layout.sh "${!rootfs_var}" "$cache_dir/images/$lang.oci" "$path_env" "LANG=C.UTF-8")
  if [ "$profile" = release ]; then bin=target/release/moat; else bin=target/debug/moat; fi
  "$bin" image import "$layout" --tag "microsandbox/$lang" --force --broker-config build/broker.toml >/dev/null
done
step "ready: build/broker.toml"

# Gateway test tools: the official MCP inspector (its CLI drives /mcp in the
# gateway_mcp e2e suite) cached under /var/cache/moat/npm, and wrk for
# `make bench` (the gateway next to nginx).
step "gateway test tools: MCP inspector (npm, cached) and wrk"
inspector_version=2.12.0
npm_dir=/var/cache/moat/npm
if ! command -v npm >/dev/null || ! command -v node >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nodejs npm >&2
fi
have=$(node -p "require('$npm_dir/node_modules/@modelcontextprotocol/inspector/package.json').version" 2>/dev/null || true)
if [ "$have" != "$inspector_version" ]; then
  mkdir -p "$npm_dir"
  npm install --no-audit --no-fund --loglevel=error --prefix "$npm_dir" \
    "@modelcontextprotocol/inspector@$inspector_version" >&2
fi
[ -x "$npm_dir/node_modules/.bin/mcp-inspector" ] \
  || { echo "setup: the MCP inspector did not install under $npm_dir" >&2; exit 1; }
if ! dpkg-query -W -f='${Status}' wrk 2>/dev/null | grep -q "install ok installed"; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends wrk >&2
fi

#!/usr/bin/env bash
# Installs the system packages Flotilla builds and tests with (Debian 12). Run as root.
set -euo pipefail
packages=(clang libclang-dev protobuf-compiler librocksdb-dev pkg-config etcd-client etcd-server iptables iproute2 openssl)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi
command -v cargo >/dev/null || { echo "cargo not found: install a Rust toolchain (rustup) first" >&2; exit 1; }

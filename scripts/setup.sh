#!/usr/bin/env bash
# Installs the system packages Flotilla builds and tests with (Debian 12). Run as root.
set -euo pipefail
packages=(clang libclang-dev protobuf-compiler librocksdb-dev libsnappy-dev liblz4-dev libzstd-dev libbz2-dev zlib1g-dev pkg-config etcd-client etcd-server iptables iproute2 openssl)
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
# The apiserver's tests drive real kubectl 1.32, which Debian does not package (its
# kubernetes-client is 1.20); the build machines have it at /usr/bin/kubectl.
if ! /usr/bin/kubectl version --client >/dev/null 2>&1; then
  echo "kubectl 1.32 not found at /usr/bin/kubectl: install it (e.g. from Kubernetes' own packages)" >&2
  exit 1
fi

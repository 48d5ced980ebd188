#!/usr/bin/env bash
# The test suite: unit tests and black-box tests with the real etcdctl, in the release
# profile (the one the black-box tests' binary is built with, so the build happens once).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export ETCDCTL_API=3
cargo build --release --workspace --all-targets
cargo test --release --workspace "$@"

#!/usr/bin/env bash
# The whole test suite (what CI runs): packages, formatting, lints, tests.
# Tests that need /dev/kvm fail without it unless DISCO_ALLOW_NO_KVM=1.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --release --all-targets -- -D warnings
cargo test --release

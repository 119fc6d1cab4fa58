#!/usr/bin/env bash
# The whole test suite (what CI runs): packages, formatting, lints, tests.
# Tests that need /dev/kvm fail without it unless DISCO_ALLOW_NO_KVM=1.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
scripts/install-deps.sh
# The Debian kernel, initramfs and disk image the Linux-guest tests boot
# (tests/linux_boot.rs); apt downloads, cached in target/linux-guest.
scripts/fetch-linux-guest.sh
cargo fmt --all -- --check
cargo clippy --release --all-targets -- -D warnings
cargo test --release

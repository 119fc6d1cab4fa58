#!/usr/bin/env bash
# One command on a fresh machine: system packages, release build, then the
# embedded demo (`disco run` without a config). Extra arguments go to `disco run`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
scripts/install-deps.sh
cargo build --release
echo "setup: built target/release/disco; running the embedded demo scenario"
exec target/release/disco run "$@"

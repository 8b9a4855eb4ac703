#!/usr/bin/env bash
# The README's test command: host packages, a build, and every test against the real runtimes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-host-deps.sh
# Tests start `hangar serve` and inject `hangar-init`: build every binary first.
cargo build --workspace --bins
cargo nextest run --workspace --no-fail-fast "$@"

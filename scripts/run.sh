#!/usr/bin/env bash
# Builds and runs the kagi server with embedded defaults (./kagi-data, https://localhost:8443).
# Extra arguments go to `kagi server` (e.g. --data-dir DIR --listen localhost:9443).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -q -p kagi
exec target/release/kagi server "$@"

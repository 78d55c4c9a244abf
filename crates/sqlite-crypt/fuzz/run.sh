#!/usr/bin/env bash
# Fuzzes kagi-sqlite-crypt's page decoding with cargo fuzz (libFuzzer) for a bounded time:
# SECONDS (default 30). Runs on the stable toolchain through RUSTC_BOOTSTRAP=1 (cargo fuzz passes
# nightly -Z flags). Installs cargo-fuzz when missing. A crash fails the script and leaves the
# input in crates/sqlite-crypt/fuzz/artifacts/decode/.
set -euo pipefail
seconds="${1:-30}"
cd "$(dirname "$0")"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
mkdir -p corpus/decode
cargo fuzz run -O decode corpus/decode -- -max_total_time="$seconds" -max_len=66000

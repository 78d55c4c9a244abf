#!/usr/bin/env bash
# Fuzzes kagi-pgsql's startup packet and message parsers, parameter decoding and SQL lexer with
# cargo fuzz (libFuzzer) for a bounded time: SECONDS per target (default 30). Runs on the stable
# toolchain through RUSTC_BOOTSTRAP=1 (cargo fuzz passes nightly -Z flags). Installs cargo-fuzz
# when missing. A crash fails the script and leaves the input in crates/pgsql/fuzz/artifacts/.
set -euo pipefail
seconds="${1:-30}"
cd "$(dirname "$0")"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
for target in startup messages sql; do
  mkdir -p "corpus/$target"
  cargo fuzz run -O "$target" "corpus/$target" -- -max_total_time="$seconds" -max_len=4096
done

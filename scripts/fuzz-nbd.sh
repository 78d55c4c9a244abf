#!/usr/bin/env bash
# Fuzzes kagi-nbd's handshake option parsers and request parser with cargo fuzz (libFuzzer) for a
# bounded time: SECONDS per target (default 30). Runs on the stable toolchain through
# RUSTC_BOOTSTRAP=1 (cargo fuzz passes nightly -Z flags). Installs cargo-fuzz when missing.
# A crash fails the script and leaves the input in crates/nbd/fuzz/artifacts/<target>/.
set -euo pipefail
seconds="${1:-30}"
cd "$(dirname "$0")/../crates/nbd/fuzz"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
for target in options requests; do
  mkdir -p "corpus/$target"
  cargo fuzz run -O "$target" "corpus/$target" -- -max_total_time="$seconds" -max_len=4200
done

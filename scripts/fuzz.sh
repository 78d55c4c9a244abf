#!/usr/bin/env bash
# Fuzzes, for SECONDS per target (default 30), every parser that reads bytes from clients or disk:
# the NBD handshake and requests (crates/nbd), the PostgreSQL startup packet, messages and SQL
# lexer (crates/pgsql), and the page codec's decoding (crates/sqlite-crypt). A crash fails the
# script and leaves the input under that crate's fuzz/artifacts/.
set -euo pipefail
seconds="${1:-30}"
cd "$(dirname "$0")/.."
scripts/fuzz-nbd.sh "$seconds"
crates/pgsql/fuzz/run.sh "$seconds"
crates/sqlite-crypt/fuzz/run.sh "$seconds"

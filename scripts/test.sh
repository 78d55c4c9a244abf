#!/usr/bin/env bash
# Runs every test: Rust unit and integration tests, then the harness scripts' tests (tests/infra:
# scripts/postgres.sh's PostgreSQL 15 primary and streaming standby), then the Azure SDK
# conformance suite against a real `kagi server` (the Python venv with the Azure SDK and psycopg
# is made first: the Rust tests of the PostgreSQL front end drive psycopg too), then the suite's
# store-facing part again with kagi's store on PostgreSQL (`--store postgres://…`; the store
# contract's PostgreSQL half runs in the Rust tests on the same scratch server), then the backup
# families with the store on PostgreSQL and the blobs in an S3 bucket (`--blobs s3://…`, on
# scripts/s3.sh's server, which the Rust tests of the blob root and the engine use too), then the
# key vault and backup families against three nodes behind a round-robin proxy, then bounded
# fuzzing runs of the NBD, PostgreSQL and page-codec parsers (KAGI_FUZZ_SECONDS per target,
# default 15).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
python3 scripts/import-loops.py .
tests/conformance/venv.sh
cargo build -q --workspace --all-targets
# A scratch PostgreSQL for the PostgreSQL store's tests and an S3 server for the blobs' tests,
# removed on exit.
pgdir="$(mktemp -d /tmp/kagi-test-pg.XXXXXX)"
s3dir="$(mktemp -d /tmp/kagi-test-s3.XXXXXX)"
trap 'scripts/postgres.sh destroy "$pgdir" >/dev/null 2>&1 || true; scripts/s3.sh destroy "$s3dir" >/dev/null 2>&1 || true' EXIT
eval "$(scripts/postgres.sh start "$pgdir" | grep '^PG_PRIMARY_URL=')"
export KAGI_TEST_POSTGRES_URL="$PG_PRIMARY_URL" KAGI_REQUIRE_POSTGRES=1
set -a
eval "$(scripts/s3.sh start "$s3dir")"
set +a
export KAGI_TEST_S3_BLOBS="$S3_BLOBS_URL" KAGI_REQUIRE_S3=1
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test -q --workspace --no-fail-fast
fi
# The project's own harness scripts: scripts/postgres.sh's primary and streaming standby, and
# scripts/s3.sh's S3 server.
"${KAGI_VENV:-$PWD/.venv}/bin/python" -m pytest -q tests/infra
KAGI_BIN="$PWD/target/debug/kagi" tests/conformance/run.sh "$@"
# The store-facing families again, every server's store in a database of its own on PostgreSQL.
KAGI_CONFORMANCE_POSTGRES="$PG_PRIMARY_URL" KAGI_BIN="$PWD/target/debug/kagi" \
  tests/conformance/run.sh -k "$(cat tests/conformance/postgres-families.txt | xargs | sed 's/ / or /g')" "$@"
# The backup families with the store on PostgreSQL and every server's blobs under a prefix of its
# own in the S3 bucket: the configuration of several nodes.
KAGI_CONFORMANCE_POSTGRES="$PG_PRIMARY_URL" KAGI_CONFORMANCE_BLOBS="$S3_BLOBS_URL" KAGI_BIN="$PWD/target/debug/kagi" \
  tests/conformance/run.sh -k "$(cat tests/conformance/blob-families.txt | xargs | sed 's/ / or /g')" "$@"
# The key vault and backup families against three nodes on that store and bucket, the session
# server's requests spread round-robin over them (strict consistency; tests/conformance/conftest.py
# `_start_cluster`).
KAGI_CONFORMANCE_NODES=3 KAGI_CONFORMANCE_POSTGRES="$PG_PRIMARY_URL" KAGI_CONFORMANCE_BLOBS="$S3_BLOBS_URL" \
  KAGI_BIN="$PWD/target/debug/kagi" \
  tests/conformance/run.sh -k "$(cat tests/conformance/node-families.txt | xargs | sed 's/ / or /g')" "$@"
# The parsers that face clients or disk bytes, under libFuzzer, for a bounded time per target.
scripts/fuzz.sh "${KAGI_FUZZ_SECONDS:-15}"

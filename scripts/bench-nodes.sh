#!/usr/bin/env bash
# Several nodes (issue 14): unwrapKey (RSA-OAEP-256, RSA 2048) and secret GET per second with
# 1, 2 and 3 kagi nodes on one PostgreSQL store, against one node on SQLite, in one run.
#
# Builds the release binary; starts a scratch PostgreSQL 15 (scripts/postgres.sh) and the nodes
# in a temp dir (each node a copy of the first one's root key, CA and admin file); then, from a
# separate client process per measurement, `kagi bench nodes --servers …` spreads the requests
# round-robin over the first N nodes (N = 1, 2, 3) and over the SQLite node alone. Prints the
# outputs and a Markdown table, then cleans up. On one machine the nodes share its cores:
# the shape (what the store costs, what spreading costs) matters more than the numbers.
#
#   scripts/bench-nodes.sh [SECONDS]     seconds per measurement (default 10)
# Environment: BENCH_SECONDS, BENCH_CONCURRENCY (requests in flight, default 16),
# BENCH_NODES_DIR (where the temp dir goes, default /var/tmp: a disk, as a server's would be),
# KAGI_BIN (a kagi binary to use instead of building the release one; for a quick check only).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-${BENCH_SECONDS:-10}}"
conc="${BENCH_CONCURRENCY:-16}"
scripts/setup.sh >/dev/null
if [ -z "${KAGI_BIN:-}" ]; then cargo build --release -q -p kagi; fi
kagi="${KAGI_BIN:-$PWD/target/release/kagi}"

dir="$(mktemp -d "${BENCH_NODES_DIR:-/var/tmp}/kagi-bench-nodes.XXXXXX")"
chmod 755 "$dir"   # the PostgreSQL clusters run as an unprivileged user
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  scripts/postgres.sh destroy "$dir/pg" >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Starts a node: start_node NAME PORT [ARGS…]; waits until it answers.
start_node() {
  local name="$1" port="$2"
  shift 2
  "$kagi" server --data-dir "$dir/$name" --listen "localhost:$port" --sql-listen none "$@" \
    >"$dir/$name.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 300); do
    if [ -f "$dir/$name/tls/ca.pem" ] &&
       curl -sf --cacert "$dir/$name/tls/ca.pem" "https://localhost:$port/healthz" >/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  echo "bench-nodes: $name did not start; log:" >&2
  tail -20 "$dir/$name.log" >&2
  exit 1
}

bench() { # bench LABEL DATA_DIR SERVERS
  echo "== $1" >&2
  "$kagi" --data-dir "$2" bench nodes --servers "$3" --seconds "$secs" --concurrency "$conc" --json \
    | tee "$dir/$1.json" >&2
}

# One node on SQLite (the embedded default).
p0="$(free_port)"
start_node sqlite "$p0"
bench sqlite-1 "$dir/sqlite" "https://localhost:$p0"
kill "${pids[0]}"; wait "${pids[0]}" 2>/dev/null || true; pids=()

# Three nodes on one PostgreSQL.
eval "$(scripts/postgres.sh start "$dir/pg" | grep '^PG_PRIMARY_URL=')"
ports=()
for i in 1 2 3; do
  ports+=("$(free_port)")
  if [ "$i" -gt 1 ]; then
    mkdir -m 700 "$dir/node$i"
    cp -a "$dir/node1/root.key" "$dir/node1/tls" "$dir/node1/bootstrap-admin.json" "$dir/node$i/"
  fi
  start_node "node$i" "${ports[$((i - 1))]}" --store "$PG_PRIMARY_URL"
done
servers=""
for n in 1 2 3; do
  servers="${servers:+$servers,}https://localhost:${ports[$((n - 1))]}"
  bench "postgres-$n" "$dir/node1" "$servers"
done

echo
echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, ${secs} s per measurement, $conc requests in flight, RSA 2048"
echo
echo "| store | nodes | unwrapKey ops/s | p50 ms | p99 ms | secret GET ops/s | p50 ms | p99 ms |"
echo "|---|---|---|---|---|---|---|---|"
for run in sqlite-1 postgres-1 postgres-2 postgres-3; do
  python3 - "$dir/$run.json" "$run" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); store, n = sys.argv[2].split("-")
u, g = r["unwrap"], r["secret_get"]
print(f"| {store} | {n} | {u['ops_per_s']:.0f} | {u['p50_ms']:.2f} | {u['p99_ms']:.2f} | "
      f"{g['ops_per_s']:.0f} | {g['p50_ms']:.2f} | {g['p99_ms']:.2f} |")
PY
done

#!/usr/bin/env bash
# Benchmarks wrapKey/unwrapKey over HTTPS (keep-alive, from a separate client process) for
# RSA-2048/3072/4096 against a fresh release server, beside the raw in-process private-key
# rate of aws-lc-rs and `openssl speed` on the same machine, in one run.
#   scripts/bench.sh [SECONDS_PER_MEASUREMENT]   (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
scripts/setup.sh
cargo build --release -q -p kagi
dir="$(mktemp -d)"
port=$((20000 + RANDOM % 20000))
target/release/kagi server --data-dir "$dir" --listen "localhost:$port" >"$dir/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do [ -f "$dir/bootstrap-admin.json" ] && curl -sf --cacert "$dir/tls/ca.pem" "https://localhost:$port/healthz" >/dev/null && break; sleep 0.1; done

echo "# $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for c in 8 32; do
  echo "## kagi over HTTPS ($c requests in flight), ${secs}s per measurement"
  target/release/kagi bench --server "https://localhost:$port" --data-dir "$dir" --seconds "$secs" --concurrency "$c"
done
echo "## $(openssl version)"
openssl speed -seconds "$secs" rsa2048 rsa3072 rsa4096 2>/dev/null | grep -E '^(rsa|  *sign)'

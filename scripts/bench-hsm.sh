#!/usr/bin/env bash
# HSM keys (issue 15): unwrapKey (RSA-OAEP) and sign (RS256) of an RSA-HSM key in a premium
# vault over HTTPS, against the raw rate of the same SoftHSM2 token called directly, in one run.
#
# Builds the release binary; makes a throwaway SoftHSM2 token and data dir in a temp dir; starts
# `kagi server` with that token; then, each from a separate client process:
#   1. `kagi bench hsm-raw`: a fresh RSA key in the token, RSA-OAEP decryption and RS256 signing
#      per second with 1 and 4 threads (each op one C_Decrypt / C_Sign), the key destroyed;
#   2. `kagi bench hsm`: a premium vault with an RSA-HSM key and a software RSA key, unwrapKey,
#      sign (and wrapKey, which touches no private key) over HTTPS with 1 and 4 requests in
#      flight (one connection each, tasks of one Rust client process);
#   3. `kagi bench hsm-raw --software` again: the token's rate after the HTTPS runs (the ratio
#      uses the mean of both) and aws-lc's rate for the software key.
# Prints the outputs and a Markdown table (HTTPS / raw, target >= 80%), then cleans up.
#
#   scripts/bench-hsm.sh [SECONDS]      seconds per measurement (default 10)
# Environment: BENCH_SECONDS (same as the argument; for a short run BENCH_SECONDS=2),
# BENCH_HSM_CLIENTS (default "1,4": threads of the raw side and requests in flight over HTTPS),
# BENCH_HSM_SIZE (default 2048), BENCH_HSM_DIR (where the temp dir goes, default /var/tmp: a
# disk, as a server's data dir, so the audit log's fdatasync costs what it costs).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-${BENCH_SECONDS:-10}}"
clients="${BENCH_HSM_CLIENTS:-1,4}"
size="${BENCH_HSM_SIZE:-2048}"
module=/usr/lib/softhsm/libsofthsm2.so
scripts/setup.sh
cargo build --release -q -p kagi
kagi="$PWD/target/release/kagi"

dir="$(mktemp -d "${BENCH_HSM_DIR:-/var/tmp}/kagi-bench-hsm.XXXXXX")"
server=""
cleanup() {
  if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  rm -rf "$dir"
}
trap cleanup EXIT

# The token, as tests/conformance/conftest.py softhsm_token() makes it.
mkdir -p "$dir/tokens"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$dir/tokens" >"$dir/softhsm2.conf"
export SOFTHSM2_CONF="$dir/softhsm2.conf"
pin=1234-bench
printf '%s\n' "$pin" >"$dir/pin"
chmod 600 "$dir/pin"
softhsm2-util --init-token --free --label kagi-bench --pin "$pin" --so-pin 5678-bench >/dev/null
token=(--pkcs11-module "$module" --pkcs11-token kagi-bench --pkcs11-pin-file "$dir/pin")

port=$((20000 + RANDOM % 20000))
"$kagi" server --data-dir "$dir/data" --listen "localhost:$port" "${token[@]}" >"$dir/server.log" 2>&1 &
server=$!
for _ in $(seq 200); do
  [ -f "$dir/data/bootstrap-admin.json" ] && curl -sf --cacert "$dir/data/tls/ca.pem" "https://localhost:$port/healthz" >/dev/null && break
  kill -0 "$server" 2>/dev/null || { cat "$dir/server.log" >&2; exit 1; }
  sleep 0.1
done
client=(--server "https://localhost:$port" --data-dir "$dir/data")

echo "# $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# $(dpkg-query -W -f='softhsm2 ${Version}' softhsm2 2>/dev/null || echo softhsm2), $(openssl version | cut -d' ' -f1-2); RSA-$size, ${secs}s per measurement, clients/threads $clients"
cat >"$dir/show.py" <<'EOF'
import json, sys
def rows(path):
    return json.load(open(path))["results"]
def pick(rs, **k):
    return next(r for r in rs if all(r[a] == v for a, v in k.items()))
mode = sys.argv[1]
if mode == "raw":
    for r in rows(sys.argv[2]):
        print("%-9s %-7s %2d threads %9.0f/s" % (r["source"], r["op"], r["threads"], r["ops_per_s"]))
elif mode == "https":
    for r in rows(sys.argv[2]):
        print("%-9s %-7s %2d in flight %9.0f/s  p50 %.2f ms  p99 %.2f ms"
              % (r["key"], r["op"], r["concurrency"], r["ops_per_s"], r["p50_ms"], r["p99_ms"]))
else:
    raw1, https, raw2 = (rows(p) for p in sys.argv[2:5])
    n = lambda v: f"{v:,.0f}"
    print("| op | clients | token raw ops/s (before / after) | RSA-HSM over HTTPS ops/s | p50 / p99 ms "
          "| HTTPS / raw | ≥ 80%? | software RSA over HTTPS | aws-lc raw | wrapKey (no private key) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in sorted({r["concurrency"] for r in https}):
        for op in ("unwrap", "sign"):
            a = pick(raw1, source="token", op=op, threads=c)["ops_per_s"]
            b = pick(raw2, source="token", op=op, threads=c)["ops_per_s"]
            raw = (a + b) / 2
            h = pick(https, key="hsm", op=op, concurrency=c)
            s = pick(https, key="software", op=op, concurrency=c)["ops_per_s"]
            sw = pick(raw2, source="software", op=op, threads=c)["ops_per_s"]
            w = pick(https, key="hsm", op="wrap", concurrency=c)["ops_per_s"]
            ratio = h["ops_per_s"] / raw
            print("| %s | %d | %s (%s / %s) | **%s** | %.2f / %.2f | **%.0f%%** | %s | %s | %s | %s |" % (
                op, c, n(raw), n(a), n(b), n(h["ops_per_s"]), h["p50_ms"], h["p99_ms"], 100 * ratio,
                "yes" if ratio >= 0.8 else "no", n(s), n(sw), n(w)))
EOF

echo "## token, raw (before the HTTPS runs)"
"$kagi" bench hsm-raw "${token[@]}" --size "$size" --seconds "$secs" --threads "$clients" --json >"$dir/raw1.json"
python3 "$dir/show.py" raw "$dir/raw1.json"
echo "## over HTTPS"
"$kagi" bench hsm "${client[@]}" --size "$size" --seconds "$secs" --concurrency "$clients" --json >"$dir/https.json"
python3 "$dir/show.py" https "$dir/https.json"
echo "## token, raw (after the HTTPS runs), and aws-lc in process"
"$kagi" bench hsm-raw "${token[@]}" --size "$size" --seconds "$secs" --threads "$clients" --software --json >"$dir/raw2.json"
python3 "$dir/show.py" raw "$dir/raw2.json"
echo "## summary (raw: mean of the two token runs; target: HTTPS >= 80% of raw)"
python3 "$dir/show.py" summary "$dir/raw1.json" "$dir/https.json" "$dir/raw2.json"

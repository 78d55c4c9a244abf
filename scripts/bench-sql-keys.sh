#!/usr/bin/env bash
# SQL TDE key benchmark (issue 13, TD-3 and TD-9), on a release `kagi server`:
#   - rotation: a server's TDE protector moved to a new key version (`kagi sql tde-key set`,
#     timed from the CLI's start to its answer, which comes after every database's DEK is
#     re-wrapped), for a server whose one database holds ~10 MB and one whose database holds
#     ~SIZE_MIB MiB (default 1024): the time should not grow with the size;
#   - restart: a server with COUNT databases (default 1000) under a key vault key; the server is
#     restarted and its log says how long opening every database took (one unwrap each, 16 at a
#     time); compared with the time of COUNT unwraps at the server's own unwrap rate, measured in
#     the same run with `kagi bench` (RSA-3072, 16 in flight). Target: within that time plus 20%.
# Prints the figures and the ratio; asserts nothing.
#
#   scripts/bench-sql-keys.sh [SIZE_MIB] [COUNT]
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib="${1:-1024}"
count="${2:-1000}"
scripts/setup.sh
cargo build --release -q -p kagi
kagi=$PWD/target/release/kagi

work="$(mktemp -d "${BENCH_SQL_DIR:-/var/tmp}/kagi-bench-sql.XXXXXX")"
pid=""
cleanup() {
  [ -n "$pid" ] && { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }
  rm -rf "$work"
}
trap cleanup EXIT
sdir="$work/kagi"
port=$((20000 + RANDOM % 20000))
sql_port=$((port + 1))
start() {
  "$kagi" server --data-dir "$sdir" --listen "localhost:$port" --sql-listen "localhost:$sql_port" \
    >>"$sdir.log" 2>&1 &
  pid=$!
  for _ in $(seq 300); do
    [ -f "$sdir/bootstrap-admin.json" ] &&
      curl -sf --cacert "$sdir/tls/ca.pem" "https://localhost:$port/healthz" >/dev/null && return 0
    sleep 0.1
  done
  echo "bench-sql-keys: the kagi server did not start" >&2; cat "$sdir.log" >&2; exit 1
}
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""; }
kc() { "$kagi" "$@" --server "https://localhost:$port" --data-dir "$sdir" --output json; }
field() { python3 -c 'import json, sys; v = json.load(sys.stdin)
for k in sys.argv[1].split("."): v = v[k]
print(v)' "$1"; }
now() { date +%s.%N; }
export KAGI_SQL_ADMIN_PASSWORD='Bench!Passw0rd1'
export PGPASSWORD="$KAGI_SQL_ADMIN_PASSWORD"

echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# scripts/bench-sql-keys.sh $size_mib $count; kagi $(git rev-parse --short HEAD), release build; data in $work"
# The keeper's hourly probe stays out of the measurements.
export KAGI_SQL_KEY_POLL_SECONDS=3600
start
vault=benchsql$RANDOM
vault_id=$(kc keyvault create --name "$vault" --resource-group bench --enable-purge-protection \
  --enable-rbac-authorization | field id)
kc keyvault key create --vault-name "$vault" --name tde --kty RSA --size 3072 >/dev/null
new_server() { # name: a server whose identity may use the vault's keys
  local s; s=$(kc sql server create -n "$1" -g bench -u benchadmin --assign-identity)
  kc role assign --assignee "$(field identity.principalId <<<"$s")" \
    --role "Key Vault Crypto Service Encryption User" --scope "$vault_id" >/dev/null
}
fill() { # server db MiB: rows of 1000 random bytes through psql
  local rows=$(($3 * 1024 * 1024 / 1000))
  psql "host=$1.localhost port=$sql_port dbname=$2 user=benchadmin sslmode=verify-full sslrootcert=$sdir/tls/ca.pem" \
    -X -q -v ON_ERROR_STOP=1 -c "CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)" \
    -c "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT $rows) INSERT INTO t (v) SELECT randomblob(1000) FROM c"
}

echo
echo "## Rotation of the TDE protector (one database per server)"
printf '%-10s %10s %12s %12s %12s\n' server db_MiB rotation_1_s rotation_2_s rotation_3_s
for mib in 10 "$size_mib"; do
  s="rot$mib"
  new_server "$s"
  kc sql db create --sql-server "$s" -g bench -n data >/dev/null
  fill "$s" data "$mib"
  on_disk=$(du -sm "$sdir/sql" | cut -f1)
  times=()
  for _ in 1 2 3; do
    kid=$(kc keyvault key rotate --vault-name "$vault" --name tde | field key.kid)
    t0=$(now)
    kc sql tde-key set --sql-server "$s" -g bench --kid "$kid" >/dev/null
    t1=$(now)
    times+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')")
  done
  printf '%-10s %10s %12s %12s %12s   (sql/ on disk: %s MiB)\n' "$s" "$mib" "${times[@]}" "$on_disk"
done

echo
echo "## $count databases opened after a restart"
kid=$(kc keyvault key rotate --vault-name "$vault" --name tde | field key.kid)
new_server many
kc sql tde-key set --sql-server many -g bench --kid "$kid" >/dev/null
t0=$(now)
seq "$count" | xargs -P 4 -I{} "$kagi" sql db create --sql-server many -g bench -n "db{}" \
  --server "https://localhost:$port" --data-dir "$sdir" >/dev/null
t1=$(now)
echo "created $count databases in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s"
# The server's own unwrap rate of an RSA-3072 key over HTTPS, 16 in flight, as the opening does.
rate=$("$kagi" bench --server "https://localhost:$port" --data-dir "$sdir" --sizes 3072 --seconds 10 \
  --concurrency 16 --json | python3 -c 'import json, sys
print(json.load(sys.stdin)["results"][0]["unwrap"]["ops_per_s"])')
stop
before=$(grep -ac "SQL databases opened" "$sdir.log" || true)
start
for _ in $(seq 600); do
  [ "$(grep -ac "SQL databases opened" "$sdir.log")" -gt "$before" ] && break
  sleep 0.1
done
line=$(sed 's/\x1b\[[0-9;]*m//g' "$sdir.log" | grep -a "SQL databases opened" | tail -1)
opened=$(sed -n 's/.*databases=\([0-9]*\).*/\1/p' <<<"$line")
unwraps=$(sed -n 's/.*unwraps=\([0-9]*\).*/\1/p' <<<"$line")
millis=$(sed -n 's/.*millis=\([0-9]*\).*/\1/p' <<<"$line")
awk -v o="$opened" -v u="$unwraps" -v m="$millis" -v r="$rate" 'BEGIN {
  ideal = u / r
  printf "opened %d databases with %d unwraps in %.2f s; %d unwraps at %.0f/s take %.2f s: ratio %.2f (target <= 1.20)\n",
    o, u, m / 1000, u, r, ideal, (m / 1000) / ideal }'

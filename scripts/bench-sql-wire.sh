#!/usr/bin/env bash
# SQL over the wire (issue 13: "throughput over the wire (psql/psycopg) reported separately"), side
# by side in one run: a database of a kagi SQL server (TDE, AES-256-GCM-SIV pages, the protector
# service-managed) and PostgreSQL 15 from Debian (initdb and pg_ctl in a temporary directory, as
# the postgres user), both over TLS on localhost with SCRAM-SHA-256 logins, driven by psycopg 3
# (bench/sql/wire.py): autocommit point reads, and read-write transactions of 10 statements (3 in 4
# reads, 1 in 4 updates; retried on a serialization failure, counted), and the same transactions
# started with a write that changes nothing (`rwi`: on kagi they wait for SQLite's one write lock
# at their start, as BEGIN IMMEDIATE does), with 1, 4 and 16 client connections, SECONDS each. The same table
# (ROWS rows: id, a short text) made by the same SQL on both. The client runs on the same 2
# cores as the server: compare the two servers, not the absolute figures.
#
#   scripts/bench-sql-wire.sh [SECONDS]   (per measurement, default 10)
# Environment: BENCH_WIRE_ROWS (default 200000), BENCH_WIRE_CLIENTS (default "1 4 16").
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-10}"
rows="${BENCH_WIRE_ROWS:-200000}"
read -ra clients <<<"${BENCH_WIRE_CLIENTS:-1 4 16}"

sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
as_pg() { if [ -z "$sudo" ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi; }
# PostgreSQL 15 from Debian, without a main cluster: scripts/setup.sh installs it.
scripts/setup.sh
pgbin=/usr/lib/postgresql/15/bin
tests/conformance/venv.sh
py="$PWD/.venv/bin/python"
cargo build --release -q -p kagi
kagi=$PWD/target/release/kagi

work="$(mktemp -d "${BENCH_WIRE_DIR:-/var/tmp}/kagi-bench-wire.XXXXXX")"
chmod 755 "$work"
pid=""
cleanup() {
  [ -n "$pid" ] && { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }
  [ -d "$work/pg" ] && as_pg "$pgbin/pg_ctl" -D "$work/pg" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
password='Bench!Passw0rd1'

# ----- kagi ------------------------------------------------------------------------------------
sdir="$work/kagi"
port=$((20000 + RANDOM % 20000))
sql_port=$((port + 1))
"$kagi" server --data-dir "$sdir" --listen "localhost:$port" --sql-listen "localhost:$sql_port" >>"$sdir.log" 2>&1 &
pid=$!
for _ in $(seq 300); do
  [ -f "$sdir/bootstrap-admin.json" ] &&
    curl -sf --cacert "$sdir/tls/ca.pem" "https://localhost:$port/healthz" >/dev/null && break
  sleep 0.1
done
kc() { "$kagi" "$@" --server "https://localhost:$port" --data-dir "$sdir" --output json >/dev/null; }
# The CLI makes a resource group with a key vault (`keyvault create`).
kc keyvault create --name "wirebench$RANDOM" --resource-group bench
KAGI_SQL_ADMIN_PASSWORD="$password" kc sql server create -n wire -g bench -u benchadmin
kc sql db create --sql-server wire -g bench -n bench
kagi_conn="host=wire.localhost port=$sql_port dbname=bench user=benchadmin password=$password sslmode=verify-full sslrootcert=$sdir/tls/ca.pem"

# ----- PostgreSQL ------------------------------------------------------------------------------
pgdir="$work/pg"
pg_port=$((port + 2))
mkdir -p "$pgdir" && $sudo chown postgres "$pgdir"
printf '%s\n' "$password" >"$work/pw" && $sudo chown postgres "$work/pw"
as_pg "$pgbin/initdb" -D "$pgdir" -U benchadmin --pwfile="$work/pw" \
  --auth=scram-sha-256 >/dev/null
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=localhost" \
  -keyout "$pgdir/server.key" -out "$pgdir/server.crt" 2>/dev/null
$sudo chown postgres "$pgdir/server.key" "$pgdir/server.crt" && $sudo chmod 600 "$pgdir/server.key"
as_pg tee -a "$pgdir/postgresql.conf" >/dev/null <<EOF
port = $pg_port
listen_addresses = 'localhost'
unix_socket_directories = '$pgdir'
ssl = on
synchronous_commit = on
fsync = on
EOF
as_pg "$pgbin/pg_ctl" -D "$pgdir" -l "$pgdir/server.log" -w start >/dev/null
PGPASSWORD="$password" psql "host=localhost port=$pg_port user=benchadmin dbname=postgres sslmode=require" \
  -X -q -c "CREATE DATABASE bench"
pg_conn="host=localhost port=$pg_port dbname=bench user=benchadmin password=$password sslmode=require"

# ----- the same table on both ------------------------------------------------------------------
for conn in "$kagi_conn" "$pg_conn"; do
  psql "$conn" -X -q -v ON_ERROR_STOP=1 \
    -c "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)" \
    -c "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < $rows) INSERT INTO t SELECT x, 'row ' || x FROM c"
done

echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# scripts/bench-sql-wire.sh $seconds: $rows rows; kagi $(git rev-parse --short HEAD) release build; PostgreSQL $("$pgbin/postgres" --version | awk '{print $3}'); psycopg $("$py" -c 'import psycopg; print(psycopg.__version__)')"
printf '%-12s %-5s %8s %12s %14s %8s\n' server mode clients tps statements/s retries
for mode in read rw rwi; do
  for c in "${clients[@]}"; do
    for target in kagi postgresql; do
      conn=$kagi_conn; [ "$target" = postgresql ] && conn=$pg_conn
      out=$("$py" bench/sql/wire.py "$conn" "$rows" "$seconds" "$c" "$mode")
      "$py" -c 'import json, sys
r = json.loads(sys.argv[2])
print("%-12s %-5s %8d %12.0f %14.0f %8d" % (sys.argv[1], r["mode"], r["clients"], r["tps"], r["statements_per_s"], r["retries"]))' "$target" "$out"
    done
  done
done

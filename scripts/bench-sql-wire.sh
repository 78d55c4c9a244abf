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
# With them (issue 14), kagi-s3: the same database on a second kagi server in several-node mode
# (one node: its store on a scratch PostgreSQL of scripts/postgres.sh, `--blobs s3://…` on the
# project's S3 server, scripts/s3.sh: moto, on this machine), so that every commit's WAL frames
# are PUT to the bucket as one object before the client hears of the commit (the live log,
# docs/SQL.md; commits that wait together share one PUT). Moto on the same machine, over
# loopback and keeping objects in memory, is a best case for the PUT's latency: a real bucket
# adds a network round trip or more to every commit. Under its rows: the server's CPU seconds,
# the live log's PUTs moto answered, transactions per PUT and moto's CPU seconds; at the end,
# its throughput against kagi's.
#
#   scripts/bench-sql-wire.sh [SECONDS]   (per measurement, default 10)
# Environment: BENCH_WIRE_ROWS (default 200000), BENCH_WIRE_CLIENTS (default "1 4 16"),
# BENCH_WIRE_S3 (1, the default, adds the kagi-s3 target; 0 leaves it, its PostgreSQL store and
# its S3 server out), BENCH_WIRE_S3_DELAY_MS (default 0; when set, kagi-s3 reaches the S3 server
# through bench/sql/delay_proxy.py, which delays each request on its way there by that many ms,
# as a bucket across a network would), BENCH_WIRE_DIR (parent of the work directory, default
# /var/tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-10}"
rows="${BENCH_WIRE_ROWS:-200000}"
read -ra clients <<<"${BENCH_WIRE_CLIENTS:-1 4 16}"
with_s3="${BENCH_WIRE_S3:-1}"
delay_ms="${BENCH_WIRE_S3_DELAY_MS:-0}"

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
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  [ -d "$work/pg" ] && as_pg "$pgbin/pg_ctl" -D "$work/pg" -m immediate stop >/dev/null 2>&1 || true
  [ ! -e "$work/s3" ] || scripts/s3.sh destroy "$work/s3" >/dev/null 2>&1 || true
  [ ! -e "$work/store" ] || scripts/postgres.sh destroy "$work/store" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
password='Bench!Passw0rd1'

# ----- kagi ------------------------------------------------------------------------------------
# A kagi server with a SQL server `wire` and its database `bench`; prints the database's
# connection string. Sets $kpid.
start_kagi() { # dir port sql-port [env...] [-- server-args...]
  local dir=$1 port=$2 sql_port=$3 envs=(); shift 3
  while (($#)) && [ "$1" != -- ]; do envs+=("$1"); shift; done
  (($#)) && shift
  env "${envs[@]}" "$kagi" server --data-dir "$dir" --listen "localhost:$port" \
    --sql-listen "localhost:$sql_port" "$@" >>"$dir.log" 2>&1 &
  kpid=$!
  pids+=("$kpid")
  local up=0
  for _ in $(seq 300); do
    [ -f "$dir/bootstrap-admin.json" ] &&
      curl -sf --cacert "$dir/tls/ca.pem" "https://localhost:$port/healthz" >/dev/null && { up=1; break; }
    sleep 0.1
  done
  ((up)) || { echo "bench-sql-wire: the kagi server in $dir did not start" >&2; cat "$dir.log" >&2; exit 1; }
}
kc() { "$kagi" "$@" --server "https://localhost:$port" --data-dir "$sdir" --output json >/dev/null; }
new_database() { # dir port sql-port: on that server, sets $conn to its database's connection string
  local sdir=$1 port=$2 sql_port=$3
  # The CLI makes a resource group with a key vault (`keyvault create`).
  kc keyvault create --name "wirebench$RANDOM" --resource-group bench
  KAGI_SQL_ADMIN_PASSWORD="$password" kc sql server create -n wire -g bench -u benchadmin
  kc sql db create --sql-server wire -g bench -n bench
  conn="host=wire.localhost port=$sql_port dbname=bench user=benchadmin password=$password sslmode=verify-full sslrootcert=$sdir/tls/ca.pem"
}
port=$((20000 + RANDOM % 20000))
start_kagi "$work/kagi" "$port" $((port + 1))
kagi_pid=$kpid
new_database "$work/kagi" "$port" $((port + 1))
kagi_conn=$conn

# ----- kagi-s3: one node of several-node mode, the live log shipped to moto -------------------
# What a node on a shared store needs (docs/SEVERAL_NODES.md; as test_several_nodes.py's
# start_sql_cluster starts them): --store, --consistency strict, its own --sql-listen, where it
# is reached (--advertise: here its --listen address), and the bucket prefix of --blobs.
if ((with_s3)); then
  store_url=$(scripts/postgres.sh start "$work/store" | sed -n 's/^PG_PRIMARY_URL=//p')
  [ -n "$store_url" ] || { echo "bench-sql-wire: no PostgreSQL store" >&2; exit 1; }
  scripts/s3.sh start "$work/s3" >"$work/s3.env"
  mapfile -t s3_env <"$work/s3.env"
  s3_pid=$(cat "$work/s3/pid")
  s3_url=$(sed -n 's/^S3_BLOBS_URL=//p' "$work/s3.env")
  s3_prefix="bench-wire-$RANDOM"
  s3_port=$((port + 3))
  if ((delay_ms > 0)); then
    proxy_port=$((s3_port + 2))
    moto_port=$(sed -n 's,^AWS_ENDPOINT_URL=http://127.0.0.1:,,p' "$work/s3.env")
    python3 bench/sql/delay_proxy.py "$proxy_port" "$moto_port" "$delay_ms" &
    pids+=($!)
    for _ in $(seq 100); do (: <>"/dev/tcp/127.0.0.1/$proxy_port") 2>/dev/null && break; sleep 0.1; done
    for i in "${!s3_env[@]}"; do
      [[ ${s3_env[$i]} != AWS_ENDPOINT_URL=* ]] || s3_env[$i]="AWS_ENDPOINT_URL=http://127.0.0.1:$proxy_port"
    done
  fi
  start_kagi "$work/kagi-s3" "$s3_port" $((s3_port + 1)) "${s3_env[@]}" -- --store "$store_url" \
    --consistency strict --advertise "localhost:$s3_port" --blobs "$s3_url/$s3_prefix"
  kagi_s3_pid=$kpid
  new_database "$work/kagi-s3" "$s3_port" $((s3_port + 1))
  kagi_s3_conn=$conn
fi

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

# ----- the same table on all ---------------------------------------------------------------------
targets=(kagi)
((with_s3)) && targets+=(kagi-s3)
targets+=(postgresql)
declare -A conns=([kagi]=$kagi_conn [postgresql]=$pg_conn)
((with_s3)) && conns[kagi-s3]=$kagi_s3_conn
for t in "${targets[@]}"; do
  conn=${conns[$t]}
  psql "$conn" -X -q -v ON_ERROR_STOP=1 \
    -c "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)" \
    -c "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < $rows) INSERT INTO t SELECT x, 'row ' || x FROM c"
done

echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# scripts/bench-sql-wire.sh $seconds: $rows rows; kagi $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates || echo ' with uncommitted changes in crates/') release build; PostgreSQL $("$pgbin/postgres" --version | awk '{print $3}'); psycopg $("$py" -c 'import psycopg; print(psycopg.__version__)')"
((with_s3)) && echo "# kagi-s3: store on PostgreSQL (scripts/postgres.sh), --blobs $s3_url/$s3_prefix on moto $("${KAGI_S3_VENV:-.venv-s3}/bin/python" -c 'import moto; print(moto.__version__)') (scripts/s3.sh, loopback$( ((delay_ms > 0)) && echo ", each request delayed $delay_ms ms on its way by bench/sql/delay_proxy.py")); cpu_s: the kagi server's CPU seconds; live_puts: the live log's PUTs moto answered; tx/put: transactions per PUT; s3_cpu_s: moto's CPU seconds"
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
tck=$(getconf CLK_TCK)
secs() { awk -v d="$1" -v h="$tck" 'BEGIN { printf "%.1f", d / h }'; }
# The PUTs moto answered for the live log's pieces (its request log), and all of them.
live_puts() { grep '"PUT /' "$work/s3/log" | grep -c "/$s3_prefix/sql-live/" || true; }
all_puts() { grep -c '"PUT /' "$work/s3/log" || true; }
declare -A tps
printf '%-12s %-5s %8s %12s %14s %8s %7s %10s %7s %9s\n' server mode clients tps statements/s retries \
  cpu_s live_puts tx/put s3_cpu_s
for mode in read rw rwi; do
  for c in "${clients[@]}"; do
    for target in "${targets[@]}"; do
      spid=""
      case $target in kagi) spid=$kagi_pid ;; kagi-s3) spid=$kagi_s3_pid ;; esac
      [ -z "$spid" ] || c0=$(ticks "$spid")
      if [ "$target" = kagi-s3 ]; then m0=$(ticks "$s3_pid"); p0=$(live_puts); a0=$(all_puts); fi
      out=$("$py" bench/sql/wire.py "${conns[$target]}" "$rows" "$seconds" "$c" "$mode")
      cpu=- puts=- per=- s3cpu=-
      [ -z "$spid" ] || cpu=$(secs $(($(ticks "$spid") - c0)))
      if [ "$target" = kagi-s3 ]; then
        s3cpu=$(secs $(($(ticks "$s3_pid") - m0)))
        puts=$(($(live_puts) - p0))
        other=$(($(all_puts) - a0 - puts))
        ((other == 0)) || puts="$puts+$other" # other PUTs (backups) during the run, if any
      fi
      read -r tx line < <("$py" -c 'import json, sys
r = json.loads(sys.argv[2])
puts = sys.argv[4].split("+")[0]
per = "-" if sys.argv[4] == "-" or r["mode"] == "read" or int(puts) == 0 else "%.1f" % (r["transactions"] / int(puts))
print("%.1f" % r["tps"], "%-12s %-5s %8d %12.0f %14.0f %8d %7s %10s %7s %9s" % (sys.argv[1], r["mode"], r["clients"],
      r["tps"], r["statements_per_s"], r["retries"], sys.argv[3], sys.argv[4], per, sys.argv[5]))' \
        "$target" "$out" "$cpu" "$puts" "$s3cpu")
      echo "$line"
      tps[$target,$mode,$c]=$tx
    done
  done
done

if ((with_s3)); then
  echo
  echo "## The cost of shipping the live log: kagi-s3 against kagi (transactions/s; 1.00 = free);"
  echo "## added_ms: how much longer each transaction took (clients / tps, the difference)"
  printf '%-5s %8s %21s %7s %9s\n' mode clients "kagi-s3 / kagi" ratio added_ms
  for mode in read rw rwi; do
    for c in "${clients[@]}"; do
      awk -v m="$mode" -v c="$c" -v a="${tps[kagi-s3,$mode,$c]}" -v b="${tps[kagi,$mode,$c]}" 'BEGIN {
        printf "%-5s %8d %10.0f / %-8.0f %7.2f %9.2f\n", m, c, a, b, a / b, 1000 * c * (1 / a - 1 / b) }'
    done
  done
  echo "# bucket: $(all_puts) PUTs in all, the live log's $(live_puts) (the 200,000-row load's among them); the rest: the probe at start, backups"
fi
echo "# load average at the end $(cut -d' ' -f1-3 /proc/loadavg)"

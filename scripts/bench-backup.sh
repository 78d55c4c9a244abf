#!/usr/bin/env bash
# Backup benchmark, side by side in one run on the same ~1 GB mixed data set
# (scripts/gen-backup-dataset.py): kagi's engine alone, kagi's backup vault service end to end,
# restic and borg (Debian packages). Each does a full backup, an incremental backup after a
# scattered 1% change, and a full restore of the newest point. Also the backup agent
# (kagi-agt): a machine's own agent, encrypting locally and storing over HTTPS. Reports wall seconds, MB/s, CPU
# seconds, repository size and bytes added by the incremental.
#
# The service column ("kagi-svc") goes through a real `kagi server` on a temporary data dir and
# the `kagi backup` CLI, as a user would: a key vault with purge protection (soft delete is
# always on) holding an RSA key, a backup vault with a system-assigned identity granted
# "Key Vault Crypto Service Encryption User" on the key vault (get/list, wrapKey, unwrapKey),
# the key assigned as the vault's customer-managed key, the data set folder protected as an
# item. Its wall time is the CLI's (start, token, POST, a long poll until the job
# ends); its CPU is the server's (from /proc/PID/stat, before and after) plus the CLI's; engine_s
# is the job's own `stats.durationMs` (the engine's part of the job).
#   scripts/bench-backup.sh [SIZE_MB]   (default 1024)
set -euo pipefail
cd "$(dirname "$0")/.."
size="${1:-1024}"
command -v restic >/dev/null && command -v borg >/dev/null || {
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq restic borgbackup >/dev/null
}
scripts/setup.sh
cargo build --release -q -p kagi-backup --example engine_bench
cargo build --release -q -p kagi
work="$(mktemp -d /var/tmp/kagi-bench.XXXXXX)"
server=""
cleanup() {
  if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
python3 scripts/gen-backup-dataset.py "$work/data" --size-mb "$size"
bytes=$(du -sb "$work/data" | cut -f1)
echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), data set $((bytes / 1000000)) MB"
printf '%-8s %-12s %8s %8s %9s %9s\n' tool step seconds MB/s cpu_s engine_s

measure() { # tool step command...
  local tool=$1 step=$2; shift 2
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  /usr/bin/time -f "%e %U %S" -o "$work/time" "$@" >/dev/null 2>&1
  read -r wall user sys < "$work/time"
  awk -v t="$tool" -v s="$step" -v w="$wall" -v u="$user" -v y="$sys" -v b="$bytes" \
    'BEGIN { printf "%-8s %-12s %8.2f %8.0f %9.2f\n", t, s, w, b / 1e6 / w, u + y }'
}
size_of() { du -sb "$1" | cut -f1; }

# kagi: the engine as the backup vault service runs it (AES-256-GCM, zstd, keyed chunk ids).
k="target/release/examples/engine_bench"

measure kagi full "$k" backup "$work/data" "$work/krepo"
kfull=$(size_of "$work/krepo")
python3 scripts/gen-backup-dataset.py "$work/data" --mutate
measure kagi incremental "$k" backup "$work/data" "$work/krepo"
kinc=$(( $(size_of "$work/krepo") - kfull ))
measure kagi restore "$k" restore "$work/krepo" "$work/kout"
rm -rf "$work/kout"

# kagi-svc: the backup vault service through a real server and the CLI, on fresh data (same
# seed), so it sees the same full/incremental pair as every other tool.
rm -rf "$work/data"
python3 scripts/gen-backup-dataset.py "$work/data" --size-mb "$size"
sdir="$work/server"
port=$((20000 + RANDOM % 20000))
target/release/kagi server --data-dir "$sdir" --listen "localhost:$port" >"$work/server.log" 2>&1 &
server=$!
for _ in $(seq 100); do [ -f "$sdir/bootstrap-admin.json" ] && curl -sf --cacert "$sdir/tls/ca.pem" "https://localhost:$port/healthz" >/dev/null && break; sleep 0.1; done
kc() { target/release/kagi "$@" --server "https://localhost:$port" --data-dir "$sdir" --output json; }
field() { python3 -c 'import json, sys; v = json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."): v = v[k]
print(v)' "$@"; }
kv="benchkv$RANDOM"
kc keyvault create --name "$kv" --resource-group bench --enable-purge-protection \
  --enable-rbac-authorization >"$work/kv.json"
kc keyvault key create --vault-name "$kv" --name cmk --kty RSA --size 3072 >/dev/null
kc backup vault create --vault bench --resource-group bench --location westeurope \
  --system-assigned >"$work/bv.json"
kc role assign --assignee "$(field "$work/bv.json" identity.principalId)" \
  --role "Key Vault Crypto Service Encryption User" --scope "$(field "$work/kv.json" id)" >/dev/null
key_uri="$(field "$work/kv.json" properties.vaultUri | sed 's:/*$::')/keys/cmk"
kc backup vault encryption --vault bench --resource-group bench --key-uri "$key_uri" >/dev/null
kc backup item protect --vault bench --resource-group bench --name data --source "$work/data" >/dev/null

server_ticks() { awk '{ print $14 + $15 }' "/proc/$server/stat"; }
tck=$(getconf CLK_TCK)
measure_service() { # step out.json kagi-args...
  local step=$1 out=$2; shift 2
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  local t0; t0=$(server_ticks)
  /usr/bin/time -f "%e %U %S" -o "$work/time" target/release/kagi "$@" \
    --server "https://localhost:$port" --data-dir "$sdir" --output json >"$out" 2>"$work/cli.err" \
    || { cat "$work/cli.err" >&2; exit 1; }
  local t1; t1=$(server_ticks)
  read -r wall user sys < "$work/time"
  local engine; engine=$(field "$out" stats.durationMs)
  awk -v s="$step" -v w="$wall" -v u="$user" -v y="$sys" -v b="$bytes" -v d=$((t1 - t0)) \
    -v h="$tck" -v e="$engine" \
    'BEGIN { printf "%-8s %-12s %8.2f %8.0f %9.2f %9.2f\n", "kagi-svc", s, w, b / 1e6 / w, d / h + u + y, e / 1000 }'
}
item_dir() { find "$sdir/backup" -type d -path '*/items/data' | head -1; }

measure_service full "$work/s1.json" backup now --vault bench --resource-group bench --item data
sfull=$(size_of "$(item_dir)")
python3 scripts/gen-backup-dataset.py "$work/data" --mutate
measure_service incremental "$work/s2.json" backup now --vault bench --resource-group bench --item data
sinc=$(( $(size_of "$(item_dir)") - sfull ))
mkdir -p "$work/sout"
measure_service restore "$work/s3.json" backup restore --vault bench --resource-group bench \
  --item data --recovery-point "$(field "$work/s2.json" stats.recoveryPointId)" --target "$work/sout"
rm -rf "$work/sout"

# kagi-agt: the backup agent of a machine (docs/AGENT.md) against the same server: it encrypts
# on the "machine" and stores objects over HTTPS through the agent routes (each one fsynced by
# the server before it answers). Fresh data, same seed. CPU is the agent's plus the server's.
rm -rf "$work/data"
python3 scripts/gen-backup-dataset.py "$work/data" --size-mb "$size"
kc backup vault create --vault benchagent --resource-group bench --location westeurope >/dev/null
kc backup vault credentials --vault benchagent --resource-group bench --out "$work/agent.cred" >/dev/null
printf 'bench passphrase of the agent\n' > "$work/agent.pass"
ka() { target/release/kagi agent --state-dir "$work/agent-state" "$@" --output json; }
ka register --vault-credentials "$work/agent.cred" --machine-name bench.example \
  --passphrase-file "$work/agent.pass" >/dev/null 2>&1
ka protect "$work/data" >/dev/null
measure_agent() { # step kagi-agent-args...
  local step=$1; shift
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  local t0; t0=$(server_ticks)
  /usr/bin/time -f "%e %U %S" -o "$work/time" target/release/kagi agent \
    --state-dir "$work/agent-state" "$@" >/dev/null 2>"$work/agent.err" \
    || { cat "$work/agent.err" >&2; exit 1; }
  local t1; t1=$(server_ticks)
  read -r wall user sys < "$work/time"
  awk -v s="$step" -v w="$wall" -v u="$user" -v y="$sys" -v b="$bytes" -v d=$((t1 - t0)) -v h="$tck" \
    'BEGIN { printf "%-8s %-12s %8.2f %8.0f %9.2f\n", "kagi-agt", s, w, b / 1e6 / w, d / h + u + y }'
}
agent_dir() { find "$sdir/backup" -type d -path '*/agents/machines/bench.example' | head -1; }
measure_agent full backup
afull=$(size_of "$(agent_dir)")
python3 scripts/gen-backup-dataset.py "$work/data" --mutate
measure_agent incremental backup
ainc=$(( $(size_of "$(agent_dir)") - afull ))
measure_agent restore restore --target "$work/aout"
rm -rf "$work/aout"
kill "$server"; wait "$server" 2>/dev/null || true; server=""

# Fresh data for the peers (same seed), so each tool sees the same full/incremental pair.
rm -rf "$work/data"
python3 scripts/gen-backup-dataset.py "$work/data" --size-mb "$size"
export RESTIC_PASSWORD=bench BORG_PASSPHRASE=bench BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes
restic init -q -r "$work/rrepo"
measure restic full restic -q -r "$work/rrepo" backup "$work/data"
rfull=$(size_of "$work/rrepo")
borg init -e repokey "$work/brepo" >/dev/null 2>&1
measure borg full borg create "$work/brepo::a" "$work/data"
bfull=$(size_of "$work/brepo")
python3 scripts/gen-backup-dataset.py "$work/data" --mutate
measure restic incremental restic -q -r "$work/rrepo" backup "$work/data"
rinc=$(( $(size_of "$work/rrepo") - rfull ))
measure borg incremental borg create "$work/brepo::b" "$work/data"
binc=$(( $(size_of "$work/brepo") - bfull ))
mkdir -p "$work/rout" "$work/bout"
measure restic restore restic -q -r "$work/rrepo" restore latest --target "$work/rout"
measure borg restore sh -c "cd '$work/bout' && borg extract '$work/brepo::b'"

echo
printf '%-8s %14s %22s\n' tool repository_MB incremental_added_MB
printf '%-8s %14.0f %22.1f\n' kagi "$(echo "$kfull/1000000" | bc -l)" "$(echo "$kinc/1000000" | bc -l)"
printf '%-8s %14.0f %22.1f\n' kagi-svc "$(echo "$sfull/1000000" | bc -l)" "$(echo "$sinc/1000000" | bc -l)"
printf '%-8s %14.0f %22.1f\n' kagi-agt "$(echo "$afull/1000000" | bc -l)" "$(echo "$ainc/1000000" | bc -l)"
printf '%-8s %14.0f %22.1f\n' restic "$(echo "$rfull/1000000" | bc -l)" "$(echo "$rinc/1000000" | bc -l)"
printf '%-8s %14.0f %22.1f\n' borg "$(echo "$bfull/1000000" | bc -l)" "$(echo "$binc/1000000" | bc -l)"

#!/usr/bin/env bash
# Backup to S3 against local files (issue 14), side by side in one run on the same mixed data set
# (scripts/gen-backup-dataset.py): kagi's backup engine (as the backup vault service runs it)
# writing its repository to a local folder (fsync per object) and to an S3 bucket (one PUT per
# object; scripts/s3.sh's server, moto, on this machine). Each does a full backup, an
# incremental backup after a scattered 1% change, and a restore of the newest point. Reports
# wall seconds, MB/s and CPU seconds of the engine; the S3 server's CPU is its own column.
#   scripts/bench-blobs.sh [SIZE_MB]   (default 512)
set -euo pipefail
cd "$(dirname "$0")/.."
size="${1:-512}"
scripts/setup.sh
cargo build --release -q -p kagi-backup --example engine_bench
work="$(mktemp -d /var/tmp/kagi-bench-blobs.XXXXXX)"
cleanup() { scripts/s3.sh destroy "$work/s3" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
set -a
eval "$(scripts/s3.sh start "$work/s3")"
set +a
s3pid="$(cat "$work/s3/pid")"
python3 scripts/gen-backup-dataset.py "$work/data" --size-mb "$size"
bytes=$(du -sb "$work/data" | cut -f1)
echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), data set $((bytes / 1000000)) MB"
printf '%-8s %-12s %8s %8s %9s %9s\n' target step seconds MB/s cpu_s s3_cpu_s
k="target/release/examples/engine_bench"
ticks() { awk '{print $14 + $15}' "/proc/$s3pid/stat"; }

measure() { # target step command...
  local target=$1 step=$2; shift 2
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  local before after
  before=$(ticks)
  /usr/bin/time -f "%e %U %S" -o "$work/time" "$@" >/dev/null 2>&1
  after=$(ticks)
  read -r wall user sys < "$work/time"
  awk -v t="$target" -v s="$step" -v w="$wall" -v u="$user" -v y="$sys" -v b="$bytes" \
    -v c="$(( after - before ))" -v hz="$(getconf CLK_TCK)" \
    'BEGIN { printf "%-8s %-12s %8.2f %8.0f %9.2f %9.2f\n", t, s, w, b / 1e6 / w, u + y, c / hz }'
}

cp -a "$work/data" "$work/data0"
measure local full "$k" backup "$work/data" "$work/repo"
python3 scripts/gen-backup-dataset.py "$work/data" --mutate
measure local incremental "$k" backup "$work/data" "$work/repo"
measure local restore "$k" restore "$work/repo" "$work/out"
rm -rf "$work/out" "$work/data"
mv "$work/data0" "$work/data"

export KAGI_BENCH_KEY_FILE="$work/s3.key"
repo="$S3_BLOBS_URL/bench"
measure s3 full "$k" backup "$work/data" "$repo"
python3 scripts/gen-backup-dataset.py "$work/data" --mutate
measure s3 incremental "$k" backup "$work/data" "$repo"
measure s3 restore "$k" restore "$repo" "$work/out"
cmp <(cd "$work/data" && find . -type f -exec sha256sum {} + | sort) \
    <(cd "$work/out" && find . -type f -exec sha256sum {} + | sort) >/dev/null \
  && echo "# restored from S3: identical to the source" \
  || { echo "# restored from S3: DIFFERS from the source" >&2; exit 1; }

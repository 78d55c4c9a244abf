#!/usr/bin/env bash
# Backup engine benchmark, side by side in one run: kagi's engine, restic and borg (Debian
# packages) on the same ~1 GB mixed data set (scripts/gen-backup-dataset.py): a full backup,
# an incremental backup after a scattered 1% change, and a full restore. Reports wall seconds,
# MB/s, CPU seconds, repository size and bytes added by the incremental.
#   scripts/bench-backup.sh [SIZE_MB]   (default 1024)
set -euo pipefail
cd "$(dirname "$0")/.."
size="${1:-1024}"
command -v restic >/dev/null && command -v borg >/dev/null || {
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq restic borgbackup >/dev/null
}
cargo build --release -q -p kagi-backup --example engine_bench
work="$(mktemp -d /var/tmp/kagi-bench.XXXXXX)"
trap 'rm -rf "$work"' EXIT
python3 scripts/gen-backup-dataset.py "$work/data" --size-mb "$size"
bytes=$(du -sb "$work/data" | cut -f1)
echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), data set $((bytes / 1000000)) MB"
printf '%-8s %-12s %8s %8s %9s\n' tool step seconds MB/s cpu_s

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
printf '%-8s %14.0f %22.1f\n' restic "$(echo "$rfull/1000000" | bc -l)" "$(echo "$rinc/1000000" | bc -l)"
printf '%-8s %14.0f %22.1f\n' borg "$(echo "$bfull/1000000" | bc -l)" "$(echo "$binc/1000000" | bc -l)"

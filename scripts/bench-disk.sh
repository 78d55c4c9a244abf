#!/usr/bin/env bash
# Disk benchmark (issue 12), side by side in one run: kagi managed disks served over NBD (platform
# key; a customer-managed key through a disk encryption set; double encryption) against qemu-nbd
# on a raw file, qemu-nbd on a LUKS image and nbdkit's file plugin with its luks filter. Every
# target is an NBD export on a Unix socket, its data in the same directory under /var/tmp.
# With them (issue 14), kagi-pmk-s3: the same platform-key disk on a second kagi server started
# with `--blobs s3://…` on the project's own S3 server (scripts/s3.sh: moto, on this machine),
# so that every flush and FUA write also uploads the log's newly durable bytes (one
# create-if-absent object per segment touched, docs/DISK_FORMAT.md "Shipping") before it is
# acknowledged. Moto on the same machine, over loopback and keeping objects in memory, is a
# best case for the upload's latency: a real bucket adds a network round trip or more per
# flush. (Moto's own CPU, and the PUTs it served, are printed for that target after its row.)
#
# Per target, the page cache dropped before each step:
#   - nbdcopy of SIZE MiB of random data into the export (with --flush: the copy ends when the
#     data is durable), then nbdcopy of the export to null: (MB/s);
#   - fio's nbd engine (one connection, 16 requests in flight): 1 MiB sequential write (with a
#     final flush, end_fsync) and read over the SIZE MiB (MB/s); 4 KiB random write (with a
#     final flush) and read over the same range, each for BENCH_DISK_RUNTIME seconds (IOPS);
#     and 4 KiB random writes each followed by a flush (fio's fsync=1, as a database that
#     commits every write would do), also for BENCH_DISK_RUNTIME seconds (IOPS of writes).
# Also the server's CPU seconds for the two nbdcopy steps and the bytes the target's data takes
# on the host afterwards. Then the ratios issue 12 sets as targets (printed, never asserted).
#
# Rotation: a second server (key poll and keeper tick of 1 s), a key vault with purge
# protection, one RSA-3072 key and one disk encryption set (system-assigned identity granted
# "Key Vault Crypto Service Encryption User", rotationToLatestKeyVersionEnabled) per scenario:
# 1,000 disks of 1 GiB, 100 of 1 GiB, 100 of 64 GiB, created with the CLI (4 at a time). The
# key is rotated (`kagi keyvault key rotate`, three times per scenario), and each time the set is
# polled until its activeKey.keyUrl names the new version: the time from the rotation, and the
# time the set first showed `previousKeys` (the re-wrap running), are printed, with the
# server's own count of re-wrapped disks.
#
#   scripts/bench-disk.sh [SIZE_MIB]   (default 1024; rounded up to whole GiB, as disks are)
# Environment: BENCH_DISK_ROUNDS (rounds over all targets, interleaved; medians are reported;
# default 5; 0 skips the I/O part), BENCH_DISK_RUNTIME (seconds per random fio run, default 20),
# BENCH_DISK_ROTATION (space-separated COUNTxGIB scenarios, default "1000x1 100x1 100x64";
# empty to skip), BENCH_DISK_ROTATIONS (rotations per scenario, default 3), BENCH_DISK_DIR
# (parent directory of the work directory, default /var/tmp), BENCH_DISK_S3 (1, the default,
# adds the kagi-pmk-s3 target; 0 leaves it and its S3 server out).
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib="${1:-1024}"
gib=$(((size_mib + 1023) / 1024))
size_mib=$((gib * 1024))
bytes=$((size_mib * 1024 * 1024))
runtime="${BENCH_DISK_RUNTIME:-20}"
rounds="${BENCH_DISK_ROUNDS:-5}"
rotation="${BENCH_DISK_ROTATION-1000x1 100x1 100x64}"
rotations="${BENCH_DISK_ROTATIONS:-3}"
with_s3="${BENCH_DISK_S3:-1}"

need=()
command -v fio >/dev/null || need+=(fio)
command -v nbdkit >/dev/null && [ -e "$(nbdkit --dump-config | sed -n 's/^filterdir=//p')/nbdkit-luks-filter.so" ] ||
  need+=(nbdkit)
command -v qemu-nbd >/dev/null && command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v nbdcopy >/dev/null && command -v nbdinfo >/dev/null || need+=(libnbd-bin)
if ((${#need[@]})); then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
fio --enghelp=nbd >/dev/null 2>&1 || { echo "bench-disk: this fio has no nbd engine" >&2; exit 1; }
scripts/setup.sh
cargo build --release -q -p kagi
kagi=target/release/kagi

work="$(mktemp -d "${BENCH_DISK_DIR:-/var/tmp}/kagi-bench-disk.XXXXXX")"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  [ ! -e "$work/s3" ] || scripts/s3.sh destroy "$work/s3" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
stop() { # pid: ends a server this script started
  kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true
  local keep=() p; for p in "${pids[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  pids=("${keep[@]}")
}

echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(uname -r)"
echo "# scripts/bench-disk.sh $size_mib: $size_mib MiB per target, $rounds round(s), random fio runs of ${runtime} s, data in $work"
echo "# kagi $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates || echo ' with uncommitted changes in crates/'), release build"
echo "# $(qemu-nbd --version | head -1); nbdkit $(nbdkit --version | cut -d' ' -f2); $(nbdcopy --version | head -1); $(fio --version)"
echo "# $(findmnt -no SOURCE,FSTYPE,OPTIONS -T "$work"), load average $(cut -d' ' -f1-3 /proc/loadavg)"


# ----- kagi servers -----------------------------------------------------------------------------
start_kagi() { # dir port [env...] [-- server-args...]: starts a server, sets $kpid
  local dir=$1 port=$2 envs=(); shift 2
  while (($#)) && [ "$1" != -- ]; do envs+=("$1"); shift; done
  (($#)) && shift
  env "${envs[@]}" "$kagi" server --data-dir "$dir" --listen "localhost:$port" "$@" >"$dir.log" 2>&1 &
  kpid=$!
  pids+=("$kpid")
  for _ in $(seq 200); do
    [ -f "$dir/bootstrap-admin.json" ] && [ -S "$dir/nbd.sock" ] &&
      curl -sf --cacert "$dir/tls/ca.pem" "https://localhost:$port/healthz" >/dev/null && return 0
    sleep 0.1
  done
  echo "bench-disk: the kagi server did not start" >&2; cat "$dir.log" >&2; exit 1
}
field() { python3 -c 'import json, sys; v = json.load(sys.stdin)
for k in sys.argv[1].split("."): v = v[k]
print(v)' "$1"; }
# A vault with purge protection and RBAC, in the server at $sdir/$port.
kc() { "$kagi" "$@" --server "https://localhost:$port" --data-dir "$sdir" --output json; }
kt() { "$kagi" "$@" --server "https://localhost:$port" --data-dir "$sdir" --output table; }
new_set() { # name key-url [--double|--auto-rotate]: a set whose identity may use the vault's keys
  local name=$1 kid=$2; shift 2
  local des; des=$(kc disk-encryption-set create -n "$name" -g bench --key-url "$kid" "$@")
  kc role assign --assignee "$(field identity.principalId <<<"$des")" \
    --role "Key Vault Crypto Service Encryption User" --scope "$vault_id" >/dev/null
  field id <<<"$des"
}

# ----- measurements -----------------------------------------------------------------------------
# res[target,step] holds one value per round; tables show the last round, then the medians.
declare -A res
put() { res[$1,$2]="${res[$1,$2]:-}${res[$1,$2]:+ }$3"; }
last() { echo "${res[$1,$2]##* }"; }
median() {
  tr ' ' '\n' <<<"${res[$1,$2]}" | sort -g | awk '{ a[NR] = $1 } END {
    if (NR % 2) print a[(NR + 1) / 2]; else printf "%.4g\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
tck=$(getconf CLK_TCK)
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
mbps() { awk -v b="$bytes" -v a="$1" -v z="$2" 'BEGIN { printf "%.0f", b / 1e6 / (z - a) }'; }
copy_step() { # target step server-pid nbdcopy-args...
  local t=$1 step=$2 spid=$3; shift 3
  drop
  local c0 t0 t1 c1
  c0=$(ticks "$spid"); t0=$(now); s3_before
  nbdcopy "$@"
  t1=$(now); c1=$(ticks "$spid")
  put "$t" "$step" "$(mbps "$t0" "$t1")"
  put "$t" "${step}_cpu" "$(awk -v d=$((c1 - c0)) -v h="$tck" 'BEGIN { printf "%.1f", d / h }')"
  s3_after "$t" "$step"
}
# For the kagi-pmk-s3 target ($s3_target set): the S3 server's CPU seconds and the PUTs it
# answered (its request log) during a step.
s3_before() { [ -z "${s3_target:-}" ] || { s3c0=$(ticks "$s3_pid"); s3p0=$(s3_puts); }; }
s3_after() { # target step
  [ -n "${s3_target:-}" ] || return 0
  put "$1" "$2_s3cpu" "$(awk -v d=$(($(ticks "$s3_pid") - s3c0)) -v h="$tck" 'BEGIN { printf "%.1f", d / h }')"
  put "$1" "$2_puts" $(($(s3_puts) - s3p0))
}
s3_puts() { grep -c '"PUT /' "$work/s3/log" || true; }
# fio's runtime, and so its MB/s and IOPS, includes the final flush (end_fsync) of a write job.
fio_step() { # target step uri rw bs [fio-args...]: MB/s (1 MiB) or IOPS (4 KiB), from fio's JSON
  local t=$1 step=$2 uri=$3 rw=$4 bs=$5; shift 5
  local sync=0; [[ $rw == *write ]] && sync=1
  drop
  s3_before
  fio --name="$t-$step" --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth=16 \
    --size="${size_mib}M" --end_fsync="$sync" "$@" --output-format=json --output="$work/fio.json" \
    >"$work/fio.out" 2>&1 || { cat "$work/fio.out" >&2; exit 1; }
  put "$t" "$step" "$(python3 -c 'import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
assert j["error"] == 0, j["error"]
d = j["write" if sys.argv[2].endswith("write") else "read"]
print(round(d["bw_bytes"] / 1e6) if sys.argv[3] == "1M" else round(d["iops"]))' "$work/fio.json" "$rw" "$bs")"
  s3_after "$t" "$step"
}
measure() { # target uri server-pid data-path: every step, then the row
  local t=$1 uri=$2 spid=$3 data=$4
  copy_step "$t" copy_w "$spid" --flush "$work/random.img" "$uri"
  copy_step "$t" copy_r "$spid" "$uri" null:
  fio_step "$t" seq_w "$uri" write 1M
  fio_step "$t" seq_r "$uri" read 1M
  fio_step "$t" rnd_w "$uri" randwrite 4k --time_based --runtime="$runtime" --norandommap --randrepeat=0
  fio_step "$t" rnd_r "$uri" randread 4k --time_based --runtime="$runtime" --norandommap --randrepeat=0
  fio_step "$t" rnd_wf "$uri" randwrite 4k --time_based --runtime="$runtime" --norandommap --randrepeat=0 --fsync=1
  put "$t" host $(($(du -sb "$data" | cut -f1) / 1000000))
  if [ -n "${s3_target:-}" ]; then
    local objects mb
    read -r objects mb < <(bucket)
    put "$t" objects "$objects"
    put "$t" bucket "$mb"
  fi
  row last "$t"
}
steps=(copy_w copy_r seq_w seq_r rnd_w rnd_r rnd_wf)
header() {
  printf '%-12s %9s %9s %9s %9s %10s %10s %10s %9s %9s\n' target copy_w copy_r fio_seq_w fio_seq_r \
    rand_w rand_r rand_w+fl cpu_w/r host_MB
  printf '%-12s %9s %9s %9s %9s %10s %10s %10s %9s %9s\n' '' MB/s MB/s MB/s MB/s IOPS IOPS IOPS s ''
}
row() { # last|median target
  local f=$1 t=$2 s v=()
  for s in "${steps[@]}"; do v+=("$($f "$t" "$s")"); done
  printf '%-12s %9s %9s %9s %9s %10s %10s %10s %9s %9s\n' "$t" "${v[@]}" \
    "$($f "$t" copy_w_cpu)/$($f "$t" copy_r_cpu)" "$($f "$t" host)"
  [ -n "${res[$t,copy_w_puts]:-}" ] || return 0
  v=()
  for s in "${steps[@]}"; do v+=("$($f "$t" "${s}_puts")"); done
  printf '%-12s %9s %9s %9s %9s %10s %10s %10s %9s %9s\n' "  S3 PUTs" "${v[@]}" \
    "$($f "$t" objects)" "$($f "$t" bucket)"
  v=()
  for s in "${steps[@]}"; do v+=("$($f "$t" "${s}_s3cpu")"); done
  printf '%-12s %9s %9s %9s %9s %10s %10s %10s\n' "  S3 CPU s" "${v[@]}"
}
wait_nbd() { # uri
  for _ in $(seq 100); do nbdinfo --size "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "bench-disk: no NBD server at $1" >&2; exit 1
}

if ((rounds > 0)); then
head -c "$bytes" /dev/urandom >"$work/random.img"
printf 'kagi bench passphrase' >"$work/pass" # no newline: qemu's secret takes the whole file

# ----- the targets ------------------------------------------------------------------------------
# kagi: platform key, customer-managed key, double encryption. One server for all rounds; a
# fresh disk per round, deleted after it (overwrites take log space until the disk is deleted).
sdir="$work/kagi"
port=$((20000 + RANDOM % 20000))
start_kagi "$sdir" "$port"
kagi_pid=$kpid
vault=benchdisk$RANDOM
vault_id=$(kc keyvault create --name "$vault" --resource-group bench --enable-purge-protection \
  --enable-rbac-authorization | field id)
kid=$(kc keyvault key create --vault-name "$vault" --name cmk --kty RSA --size 3072 | field key.kid)
cmk_set=$(new_set cmk "$kid")
dbl_set=$(new_set double "$kid" --double)
kagi_target() { # target disk-create-args...
  local t=$1; shift
  local name="$t-$round" uid uri
  uid=$(kc disk create -n "$name" -g bench --size-gb "$gib" "$@" | field properties.uniqueId)
  uri=$(kt disk grant-access -n "$name" -g bench --access-level Write --duration-in-seconds 86400)
  measure "$t" "$uri" "$kagi_pid" "$sdir/disks/$uid"
  kc disk revoke-access -n "$name" -g bench >/dev/null
  kc disk delete -n "$name" -g bench >/dev/null
}
# qemu-nbd (raw, LUKS) and nbdkit (file + luks filter), as shipped: qemu-nbd with its default
# cache (writeback) and AIO (threads), -e 8 so that it accepts nbdcopy's connections (it then
# advertises multi-conn, as kagi does); nbdkit with its default 16 threads. The LUKS images are
# qemu-img's (LUKS1, aes-xts-plain64, sha256), with a 10 ms PBKDF2 time so that opening (per
# connection for nbdkit) does not count. A fresh image per round.
other_target() { # target data-path server-command...
  local t=$1 data=$2; shift 2
  local sock="$work/$t.sock"
  rm -f "$sock" # nbdkit leaves its socket behind
  "$@" &
  local spid=$!
  pids+=("$spid")
  wait_nbd "nbd+unix:///?socket=$sock"
  measure "$t" "nbd+unix:///?socket=$sock" "$spid" "$data"
  stop "$spid"
  rm -f "$data"
}
luks_image() { # path
  qemu-img create -q -f luks --object "secret,id=sec0,file=$work/pass" \
    -o key-secret=sec0,iter-time=10 "$1" "${gib}G"
}
# kagi-pmk-s3: a second server whose blobs, and so the disks' shipped logs, are in a bucket of
# the S3 server (under a prefix of its own); its disks as kagi-pmk's.
if ((with_s3)); then
  scripts/s3.sh start "$work/s3" >"$work/s3.env"
  mapfile -t s3_env <"$work/s3.env"
  s3_pid=$(cat "$work/s3/pid")
  s3_url=$(sed -n 's/^S3_BLOBS_URL=//p' "$work/s3.env")
  s3_python="${KAGI_S3_VENV:-.venv-s3}/bin/python"
  s3_sdir="$work/kagi-s3"
  s3_port=$((20000 + RANDOM % 20000))
  [ "$s3_port" != "$port" ] || s3_port=$((port + 1))
  start_kagi "$s3_sdir" "$s3_port" "${s3_env[@]}" -- --blobs "$s3_url/bench-disk"
  s3_kagi_pid=$kpid
fi
s3_kagi() { # command...: runs it with the second server's variables (kc, kagi_target) and figures
  local sdir=$s3_sdir port=$s3_port kagi_pid=$s3_kagi_pid s3_target=1
  "$@"
}
# Its resource group (made by the first vault in it, as on the first server).
((with_s3)) && s3_kagi kc keyvault create --name "benchs3$RANDOM" --resource-group bench >/dev/null
bucket() { # "objects MB": the disks' objects under the S3 server's prefix
  env "${s3_env[@]}" "$s3_python" - "$s3_url/bench-disk/disks/" <<'PY'
import os, sys, boto3
bucket, _, prefix = sys.argv[1].removeprefix("s3://").partition("/")
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
n = size = 0
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
    for o in page.get("Contents", []):
        n += 1
        size += o["Size"]
print(n, size // 1000000)
PY
}
targets=(kagi-pmk)
((with_s3)) && targets+=(kagi-pmk-s3)
targets+=(kagi-cmk kagi-double qemu-raw qemu-luks nbdkit-luks)
run_target() {
  case $1 in
    kagi-pmk) kagi_target kagi-pmk ;;
    kagi-pmk-s3) s3_kagi kagi_target kagi-pmk-s3 ;;
    kagi-cmk) kagi_target kagi-cmk --disk-encryption-set "$cmk_set" ;;
    kagi-double) kagi_target kagi-double --disk-encryption-set "$dbl_set" \
      --encryption-type EncryptionAtRestWithPlatformAndCustomerKeys ;;
    qemu-raw)
      truncate -s "${gib}G" "$work/raw.img"
      other_target qemu-raw "$work/raw.img" qemu-nbd -f raw -t -e 8 -k "$work/qemu-raw.sock" "$work/raw.img" ;;
    qemu-luks)
      luks_image "$work/qemu-luks.img"
      other_target qemu-luks "$work/qemu-luks.img" qemu-nbd -t -e 8 -k "$work/qemu-luks.sock" \
        --object "secret,id=sec0,file=$work/pass" \
        --image-opts "driver=luks,key-secret=sec0,file.filename=$work/qemu-luks.img" ;;
    nbdkit-luks)
      luks_image "$work/nbdkit-luks.img"
      other_target nbdkit-luks "$work/nbdkit-luks.img" nbdkit -f -U "$work/nbdkit-luks.sock" \
        --filter=luks file "$work/nbdkit-luks.img" passphrase=+"$work/pass" ;;
  esac
}

# Rounds interleave the targets, so that the load of a shared machine falls on all of them.
for round in $(seq "$rounds"); do
  drop; t0=$(now)
  dd if="$work/random.img" of="$work/dd.img" bs=1M conv=fdatasync status=none
  t1=$(now); drop
  dd if="$work/dd.img" of=/dev/null bs=1M status=none
  t2=$(now); rm -f "$work/dd.img"
  echo
  echo "# round $round of $rounds: the file system itself (dd, 1 MiB blocks): write+fdatasync $(mbps "$t0" "$t1") MB/s, read $(mbps "$t1" "$t2") MB/s; load average $(cut -d' ' -f1-3 /proc/loadavg)"
  header
  # Each round starts one target further on, so that no target always follows the same one.
  n=${#targets[@]}
  for i in $(seq 0 $((n - 1))); do run_target "${targets[$(((i + round - 1) % n))]}"; done
done
stop "$kagi_pid"
if ((with_s3)); then
  stop "$s3_kagi_pid"
  scripts/s3.sh destroy "$work/s3" >/dev/null
fi

echo
echo "## Medians of $rounds round(s): $size_mib MiB; copy_* nbdcopy, fio_seq_* 1 MiB and rand_* 4 KiB at queue depth 16; cpu_w/r: the server's CPU seconds for the two nbdcopy steps; host_MB: the target's files after the round"
((with_s3)) && echo "## rand_w+fl: 4 KiB random writes, each followed by a flush. Under kagi-pmk-s3: the PUTs the S3 server answered and its CPU seconds per step; after the steps, the objects in the bucket (under cpu_w/r) and their MB (under host_MB)"
header
for t in "${targets[@]}"; do row median "$t"; done

echo
echo "## Ratios of the medians against the targets of issue 12"
ratio() { # label kagi-target step peer factor
  awk -v l="$1" -v a="$(median "$2" "$3")" -v b="$(median "$4" "$3")" -v f="$5" 'BEGIN {
    r = a / b; printf "%-30s %8s / %-8s = %5.2f  (target >= %s: %s)\n", l, a, b, r, f, (r >= f ? "met" : "NOT met") }'
}
for k in kagi-pmk kagi-cmk kagi-double; do
  for s in copy_w copy_r seq_w seq_r; do
    ratio "$k $s / qemu-luks" "$k" "$s" qemu-luks 2
    ratio "$k $s / qemu-raw" "$k" "$s" qemu-raw 0.7
  done
  for s in rnd_w rnd_r; do ratio "$k $s / qemu-luks" "$k" "$s" qemu-luks 1; done
done
if ((with_s3)); then
  echo
  echo "## The cost of shipping the log: kagi-pmk-s3 against kagi-pmk (medians; 1.00 = free)"
  for s in "${steps[@]}"; do
    awk -v s="$s" -v a="$(median kagi-pmk-s3 "$s")" -v b="$(median kagi-pmk "$s")" 'BEGIN {
      printf "%-8s %9s / %-9s = %5.2f\n", s, a, b, a / b }'
  done
fi

fi # rounds > 0

# ----- rotation ---------------------------------------------------------------------------------
[ -n "$rotation" ] || exit 0
echo
echo "## Rotation of a disk encryption set (key poll and keeper tick 1 s)"
sdir="$work/rotation"
port=$((20000 + RANDOM % 20000))
start_kagi "$sdir" "$port" KAGI_DISK_KEY_POLL_SECONDS=1 KAGI_DISK_KEEPER_TICK_SECONDS=1
vault=benchrot$RANDOM
vault_id=$(kc keyvault create --name "$vault" --resource-group bench --enable-purge-protection \
  --enable-rbac-authorization | field id)
printf '%-10s %8s %10s %15s %9s %15s %10s %10s\n' scenario disks create_s create_ms/disk rotation \
  seen_running_s new_key_s rewrapped
for sc in $rotation; do
  n=${sc%x*} size=${sc#*x}
  key="rot$sc"
  kid=$(kc keyvault key create --vault-name "$vault" --name "$key" --kty RSA --size 3072 | field key.kid)
  set_id=$(new_set "$key" "$kid" --auto-rotate)
  t0=$(now)
  seq "$n" | xargs -P 4 -I{} "$kagi" disk create -n "$key-{}" -g bench --size-gb "$size" \
    --disk-encryption-set "$set_id" --server "https://localhost:$port" --data-dir "$sdir" >/dev/null
  t1=$(now)
  have=$(kc disk-encryption-set list-associated-resources -n "$key" -g bench |
    python3 -c 'import json, sys; v = json.load(sys.stdin); print(len(v.get("value", v) if isinstance(v, dict) else v))')
  [ "$have" -eq "$n" ] || { echo "bench-disk: the set has $have disks, not $n" >&2; exit 1; }
  for rot in $(seq "$rotations"); do
    sleep 3 # let the keeper see the set's key in force before it changes
    r0=$(now)
    new=$(kc keyvault key rotate --vault-name "$vault" --name "$key" | field key.kid)
    running=""
    while :; do
      set_json=$(kc disk-encryption-set show -n "$key" -g bench)
      t=$(now)
      [ "$(field properties.activeKey.keyUrl <<<"$set_json")" = "$new" ] && break
      [ -z "$running" ] && [ "$(field properties.previousKeys <<<"$set_json")" != "[]" ] && running=$t
      awk -v a="$r0" -v z="$t" 'BEGIN { exit !(z - a > 1800) }' &&
        { echo "bench-disk: rotation of $sc not done in 30 min" >&2; exit 1; }
      sleep 0.05
    done
    # The server's log line for the set's re-wrap names how many were added ("?" if it changed).
    added=$(sed 's/\x1b\[[0-9;]*m//g' "$sdir.log" | grep -a "re-wrapped.*diskEncryptionSets/$key " |
      tail -1 | sed -n 's/.*added=\([0-9]*\).*/\1/p' || true)
    awk -v sc="$sc" -v n="$n" -v a="$t0" -v b="$t1" -v k="$rot" -v r="$r0" -v s="$running" -v e="$t" \
      -v w="${added:-?}" 'BEGIN {
      printf "%-10s %8d %10.1f %15.1f %9d %15s %10.2f %10s\n", sc, n, b - a, (b - a) * 1000 / n, k,
        (s == "" ? "-" : sprintf("%.2f", s - r)), e - r, w }'
  done
done
echo "(seen_running_s: from the rotation to the first poll showing previousKeys; new_key_s: to the"
echo " first poll showing the new activeKey.keyUrl; polls every ~0.1 s; the keeper looks every 1 s)"

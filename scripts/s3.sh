#!/usr/bin/env bash
# An S3 server for tests and benchmarks of `kagi server --blobs s3://…` (issue 14): moto's server
# (PyPI `moto[server]`, pinned below, in a venv of its own) on a free port of 127.0.0.1, with one
# bucket. Moto keeps objects in memory and checks no signatures; it honours conditional writes
# (If-None-Match: *), which kagi's blob root probes at start.
#
#   scripts/s3.sh start DIR     a fresh server (whatever an earlier run left in DIR goes first)
#   scripts/s3.sh env DIR       prints the lines `start` printed
#   scripts/s3.sh stop DIR      stops it (idempotent)
#   scripts/s3.sh destroy DIR   stops it and removes DIR (idempotent)
#
# `start` prints shell-sourceable lines (also kept in DIR/env): the AWS variables kagi and the
# AWS tools read (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL,
# AWS_ALLOW_HTTP) and S3_BLOBS_URL=s3://kagi-blobs (the bucket, for --blobs).
# Env: KAGI_S3_VENV (default <repo>/.venv-s3), PYTHON (default python3).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
venv="${KAGI_S3_VENV:-$repo/.venv-s3}"
python="${PYTHON:-python3}"
pin="moto[server]==5.2.6"
bucket="kagi-blobs"

die() { echo "s3.sh: $*" >&2; exit 1; }
usage() { die "usage: $0 start DIR | env DIR | stop DIR | destroy DIR"; }
(($# == 2)) || usage
cmd="$1"
[ -n "$2" ] || usage
dir="$(realpath -m -- "$2")"
[ "$dir" != / ] || die "refusing DIR=/"

make_venv() {
  if [[ -x "$venv/bin/moto_server" && "$(cat "$venv/.kagi-s3.pin" 2>/dev/null || true)" == "$pin" ]]; then
    return 0
  fi
  echo "s3.sh: (re)creating the S3 server venv at $venv ($pin)" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$pin"
  echo "$pin" > "$venv/.kagi-s3.pin"
}

stop() {
  [ -f "$dir/pid" ] || return 0
  local pid
  pid="$(cat "$dir/pid")"
  # Only our server: the pid file could be stale and the number reused.
  if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q moto_server; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$dir/pid"
}

case "$cmd" in
  start)
    make_venv
    stop
    rm -rf "$dir"
    mkdir -p "$dir"
    port="$("$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    setsid "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" > "$dir/log" 2>&1 < /dev/null &
    echo $! > "$dir/pid"
    # Ready when it answers; then the bucket (moto needs no signature for this).
    "$venv/bin/python" - "$port" "$bucket" <<'PY' || { cat "$dir/log" >&2; stop; die "the S3 server did not start"; }
import sys, time, urllib.request
port, bucket = sys.argv[1], sys.argv[2]
base = f"http://127.0.0.1:{port}"
for _ in range(200):
    try:
        urllib.request.urlopen(base + "/", timeout=1).read()
        break
    except Exception:
        time.sleep(0.05)
else:
    sys.exit(1)
urllib.request.urlopen(urllib.request.Request(f"{base}/{bucket}", method="PUT"), timeout=5).read()
PY
    cat > "$dir/env" <<ENV
AWS_ACCESS_KEY_ID=kagi-test
AWS_SECRET_ACCESS_KEY=kagi-test-secret
AWS_REGION=us-east-1
AWS_ENDPOINT_URL=http://127.0.0.1:$port
AWS_ALLOW_HTTP=true
S3_BLOBS_URL=s3://$bucket
ENV
    cat "$dir/env"
    ;;
  env) cat "$dir/env" ;;
  stop) stop ;;
  destroy) stop; rm -rf "$dir" ;;
  *) usage ;;
esac

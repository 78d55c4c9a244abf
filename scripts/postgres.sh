#!/usr/bin/env bash
# PostgreSQL 15 from Debian (/usr/lib/postgresql/15/bin, installed by scripts/setup.sh) for tests
# that need a real PostgreSQL, and a streaming standby for the replica tests (issue 14). Each
# cluster lives in a directory of its own under DIR, is run by an unprivileged user (PostgreSQL
# refuses root: as root the clusters run as the system user KAGI_PG_USER, default `kagi-pg`,
# made when missing; as any other user, as that user) and listens on a free TCP port on 127.0.0.1
# only (no Unix socket: DIR may be deeper than a socket path may be long).
#
#   scripts/postgres.sh start DIR [--standby]   a fresh primary (and a standby streaming from it);
#                                               whatever a crashed earlier run left in DIR goes first
#   scripts/postgres.sh env DIR                 prints the lines `start` printed
#   scripts/postgres.sh promote DIR             the standby becomes a primary; returns once it
#                                               accepts writes
#   scripts/postgres.sh stop DIR                stops both (fast shutdown)
#   scripts/postgres.sh destroy DIR             stops both and removes DIR
#
# `start` prints shell-sourceable lines (also kept in DIR/env):
#   PG_PRIMARY_URL=postgres://kagi:PASSWORD@127.0.0.1:PORT/kagi   (role kagi, a superuser; database kagi)
#   PG_PRIMARY_DIR=DIR/primary
#   PG_STANDBY_URL=…  PG_STANDBY_DIR=DIR/standby                  (with --standby)
#   PG_BIN=/usr/lib/postgresql/15/bin
# promote, stop and destroy are idempotent: a second call, or a call on a DIR with nothing
# running, succeeds and does nothing more.
# Env: KAGI_PG_BIN (default /usr/lib/postgresql/15/bin), KAGI_PG_USER (default kagi-pg).
set -euo pipefail

pgbin="${KAGI_PG_BIN:-/usr/lib/postgresql/15/bin}"
pguser="${KAGI_PG_USER:-kagi-pg}"

die() { echo "postgres.sh: $*" >&2; exit 1; }
usage() { die "usage: $0 start DIR [--standby] | env DIR | promote DIR | stop DIR | destroy DIR"; }

(($# >= 2)) || usage
cmd="$1"
[ -n "$2" ] || usage
# An absolute path: the clusters' files and the printed lines name it, whatever the caller's cwd.
dir="$(realpath -m -- "$2")"
shift 2
[ "$dir" != / ] || die "refusing DIR=/"

# Runs a command as the clusters' owner.
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u "$pguser" -- "$@"; else "$@"; fi
}

# The processes whose working directory is in DIR: a postmaster and its children chdir to their
# data directory, so these are exactly the servers of DIR (and nothing else of the machine's).
pids_in_dir() {
  local p cwd
  for p in /proc/[0-9]*; do
    cwd="$(readlink "$p/cwd" 2>/dev/null)" || continue
    case "$cwd" in "$dir" | "$dir"/*) echo "${p#/proc/}" ;; esac
  done
}

# Stops the cluster in data directory $1 with pg_ctl mode $2 when it is running.
stop_one() {
  local data="$1" mode="$2"
  [ -f "$data/PG_VERSION" ] || return 0
  if as_pg "$pgbin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    as_pg "$pgbin/pg_ctl" -D "$data" -m "$mode" -w -t 60 stop >/dev/null
  fi
}

# Kills what is left of the servers of DIR (a postmaster killed with -9 leaves its children for a
# moment, and they hold the old shared memory a new postmaster refuses to start next to).
kill_leftovers() {
  local pids
  pids="$(pids_in_dir)"
  [ -n "$pids" ] || return 0
  # shellcheck disable=SC2086
  kill -9 $pids 2>/dev/null || true
  for _ in $(seq 100); do
    [ -z "$(pids_in_dir)" ] && return 0
    sleep 0.1
  done
  die "processes in $dir did not exit: $(pids_in_dir | xargs)"
}

# A TCP port on 127.0.0.1 nobody listens on now.
free_port() {
  python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

ensure_user() {
  [ "$(id -u)" -eq 0 ] || return 0
  id -u "$pguser" >/dev/null 2>&1 && return 0
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$pguser"
}

url() { echo "postgres://kagi:$(cat "$dir/password")@127.0.0.1:$1/kagi"; }

# Waits until the server at URL $1 answers `SELECT pg_is_in_recovery()` with $2 (t or f).
wait_recovery() {
  local got=""
  for _ in $(seq 300); do
    got="$(psql "$1" -XAtq -c 'SELECT pg_is_in_recovery()' 2>/dev/null || true)"
    [ "$got" = "$2" ] && return 0
    sleep 0.1
  done
  die "server at ${1##*@} answers pg_is_in_recovery()=${got:-nothing}, wanted $2"
}

# The cluster in data directory $1 with port $2: its settings, then started and waited for.
configure_and_start() {
  local data="$1" port="$2"
  as_pg tee -a "$data/postgresql.conf" >/dev/null <<EOF
# scripts/postgres.sh
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
hot_standby = on
wal_keep_size = '256MB'
EOF
  as_pg "$pgbin/pg_ctl" -D "$data" -l "$data.log" -w -t 60 start >/dev/null ||
    { tail -n 20 "$data.log" >&2 || true; die "$data did not start"; }
}

start() {
  local standby=0
  while (($#)); do
    case "$1" in
      --standby) standby=1 ;;
      *) usage ;;
    esac
    shift
  done
  [ -x "$pgbin/initdb" ] || die "no PostgreSQL at $pgbin: run scripts/setup.sh"
  command -v psql >/dev/null 2>&1 || die "no psql: run scripts/setup.sh"
  ensure_user
  # A crashed (or still running) earlier run: its servers stop, its files go.
  if [ -d "$dir" ]; then
    stop_one "$dir/standby" immediate 2>/dev/null || true
    stop_one "$dir/primary" immediate 2>/dev/null || true
    kill_leftovers
    rm -rf "${dir:?}/primary" "$dir/standby" "$dir/primary.log" "$dir/standby.log" "$dir/env" "$dir/password"
  fi
  mkdir -p "$dir"
  [ "$(id -u)" -ne 0 ] || chown "$pguser" "$dir"
  chmod 700 "$dir"
  as_pg test -w "$dir" ||
    die "$pguser cannot write $dir: every directory above it must be searchable by others (chmod o+x)"

  # The password is readable by the owner only; the URLs carry it, so it is kept URL-safe (hex).
  (umask 077 && openssl rand -hex 16 >"$dir/password")
  [ "$(id -u)" -ne 0 ] || chown "$pguser" "$dir/password"
  as_pg "$pgbin/initdb" -D "$dir/primary" -U kagi --pwfile="$dir/password" \
    --auth=scram-sha-256 -E UTF8 --locale=C.UTF-8 >/dev/null
  local pport sport=""
  pport="$(free_port)"
  configure_and_start "$dir/primary" "$pport"
  local purl
  purl="$(url "$pport")"
  psql "$(url "$pport" | sed 's,/kagi$,/postgres,')" -XAtq -v ON_ERROR_STOP=1 -c 'CREATE DATABASE kagi'
  {
    echo "PG_PRIMARY_URL=$purl"
    echo "PG_PRIMARY_DIR=$dir/primary"
  } >"$dir/env"
  chmod 600 "$dir/env"

  if ((standby)); then
    # A base backup of the primary with the settings to stream from it (-R), through a
    # replication slot (-C -S) so the primary keeps the WAL the standby has not read yet.
    as_pg env PGPASSWORD="$(cat "$dir/password")" "$pgbin/pg_basebackup" \
      -h 127.0.0.1 -p "$pport" -U kagi -D "$dir/standby" -R -X stream -C -S kagi_standby -c fast
    # The primary's port line came with the backup; the standby's own comes after it and wins.
    while [ -z "$sport" ] || [ "$sport" = "$pport" ]; do sport="$(free_port)"; done
    configure_and_start "$dir/standby" "$sport"
    wait_recovery "$(url "$sport")" t
    # Streaming, not merely started: the primary sees its WAL receiver.
    local n=""
    for _ in $(seq 300); do
      n="$(psql "$purl" -XAtq -c "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")"
      [ "$n" = 1 ] && break
      sleep 0.1
    done
    [ "$n" = 1 ] || die "the standby does not stream from the primary"
    {
      echo "PG_STANDBY_URL=$(url "$sport")"
      echo "PG_STANDBY_DIR=$dir/standby"
    } >>"$dir/env"
  fi
  echo "PG_BIN=$pgbin" >>"$dir/env"
  cat "$dir/env"
}

port_of() { sed -n "s/^port = \([0-9]*\)$/\1/p" "$1/postgresql.conf" | tail -1; }

promote() {
  [ -f "$dir/standby/PG_VERSION" ] || die "no standby in $dir (start DIR --standby)"
  local surl
  surl="$(url "$(port_of "$dir/standby")")"
  as_pg "$pgbin/pg_ctl" -D "$dir/standby" status >/dev/null 2>&1 || die "the standby in $dir is not running"
  # Promoted already: nothing to do. standby.signal goes at the promotion's end.
  if [ -f "$dir/standby/standby.signal" ]; then
    as_pg "$pgbin/pg_ctl" -D "$dir/standby" -w -t 60 promote >/dev/null
  fi
  wait_recovery "$surl" f
  # Accepts writes: a transaction that must write (a temporary table) commits.
  for _ in $(seq 100); do
    psql "$surl" -XAtq -c 'CREATE TEMP TABLE kagi_promoted (x int)' >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "the promoted standby refuses writes"
}

stop() {
  stop_one "$dir/standby" fast
  stop_one "$dir/primary" fast
}

destroy() {
  [ -e "$dir" ] || return 0
  stop_one "$dir/standby" immediate 2>/dev/null || true
  stop_one "$dir/primary" immediate 2>/dev/null || true
  kill_leftovers
  rm -rf "$dir"
}

case "$cmd" in
  start) start "$@" ;;
  env) (($# == 0)) || usage; cat "$dir/env" ;;
  promote) (($# == 0)) || usage; promote ;;
  stop) (($# == 0)) || usage; stop ;;
  destroy) (($# == 0)) || usage; destroy ;;
  *) usage ;;
esac

#!/usr/bin/env bash
# Installs what kagi and its tests need on a Debian machine. Idempotent; quiet when all is there.
set -euo pipefail

need_apt=()
# `*.localhost` vault hosts must resolve (to loopback) for the Azure SDK and tools.
getent hosts probe.localhost >/dev/null 2>&1 || need_apt+=(libnss-myhostname)
command -v cc >/dev/null 2>&1 || need_apt+=(gcc)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
# NBD clients the kagi-nbd tests drive (qemu-img/qemu-io/qemu-nbd; nbdinfo, nbdcopy, nbdfuse; nbdsh).
command -v qemu-img >/dev/null 2>&1 || need_apt+=(qemu-utils)
command -v nbdinfo >/dev/null 2>&1 || need_apt+=(libnbd-bin)
/usr/bin/python3 -c 'import nbd' >/dev/null 2>&1 || need_apt+=(python3-libnbd)
# A kagi disk as a file (nbdfuse, FUSE 3) under a loop device with ext4 on it (the disk tests).
command -v nbdfuse >/dev/null 2>&1 || need_apt+=(nbdfuse)
command -v fusermount3 >/dev/null 2>&1 || need_apt+=(fuse3)
command -v mkfs.ext4 >/dev/null 2>&1 || need_apt+=(e2fsprogs)
command -v losetup >/dev/null 2>&1 || need_apt+=(util-linux)
# psql, which the kagi-pgsql tests drive against the SQL service's PostgreSQL front end.
command -v psql >/dev/null 2>&1 || need_apt+=(postgresql-client)
# PostgreSQL 15's server binaries (/usr/lib/postgresql/15/bin) for scripts/postgres.sh (tests that
# need a real PostgreSQL, a primary and a streaming standby) and scripts/bench-sql-wire.sh; those
# make their own clusters in directories of their own, so Debian's main cluster is not made.
no_main_cluster=0
[ -x /usr/lib/postgresql/15/bin/initdb ] || { need_apt+=(postgresql-15); no_main_cluster=1; }
# The sqlite3 shell: the TDE tests check that it cannot read an encrypted database.
command -v sqlite3 >/dev/null 2>&1 || need_apt+=(sqlite3)
# An HSM for RSA-HSM/EC-HSM keys and the sealed root key (kagi-hsm tests, conformance), and
# pkcs11-tool to look inside its tokens.
[ -e /usr/lib/softhsm/libsofthsm2.so ] || need_apt+=(softhsm2)
command -v pkcs11-tool >/dev/null 2>&1 || need_apt+=(opensc)

if ((${#need_apt[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${need_apt[*]}" >&2
  if ((no_main_cluster)); then
    # Read by the package's postinst through the include_dir line of postgresql-common's
    # createcluster.conf (a createcluster.conf of our own would clash with that package's).
    $sudo mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" | $sudo tee /etc/postgresql-common/createcluster.d/kagi.conf >/dev/null
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is missing: install Rust (https://rustup.rs), then run this again." >&2
  exit 1
fi
getent hosts probe.localhost >/dev/null 2>&1 || {
  echo "setup: *.localhost still does not resolve; add 'myhostname' to the hosts line of /etc/nsswitch.conf" >&2
  exit 1
}

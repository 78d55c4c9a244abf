#!/usr/bin/env bash
# Run the Azure SDK conformance suite against a real `kagi server`.
#   tests/conformance/run.sh [pytest args...]      e.g.  -k crypto   -m "not cli"   -x
# Env: KAGI_BIN (default <repo>/target/debug/kagi), KAGI_VENV (default <repo>/.venv), PYTHON (default python3),
#      KAGI_AZ_VENV (default <repo>/.venv-az: the real az CLI for test_az_cli.py, made by scripts/az-venv.sh),
#      KAGI_OPENAPI_VENV (default <repo>/.venv-openapi: schemathesis for test_openapi.py, made by openapi-venv.sh).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${KAGI_VENV:-$repo/.venv}"
"$here/venv.sh"
"$repo/scripts/az-venv.sh"
"$here/openapi-venv.sh"

export KAGI_BIN="${KAGI_BIN:-$repo/target/debug/kagi}"
if [[ ! -x "$KAGI_BIN" ]]; then
    echo "run.sh: kagi binary not found at $KAGI_BIN (cargo build, or set KAGI_BIN)" >&2
    exit 2
fi

cd "$repo"
exec "$venv/bin/python" -m pytest -q tests/conformance "$@"

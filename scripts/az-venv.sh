#!/usr/bin/env bash
# Makes (or refreshes, when the pinned version changes) a venv of its own holding the real az CLI
# (azure-cli from PyPI) for the az conformance tests (tests/conformance/test_az_*.py). azure-cli pins
# its own azure-* packages, which clash with tests/conformance/requirements.txt, hence a second venv.
# Idempotent; prints nothing when the venv is already there. The az binary is "$KAGI_AZ_VENV/bin/az".
# Env: KAGI_AZ_VENV (default <repo>/.venv-az), PYTHON (default python3).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
venv="${KAGI_AZ_VENV:-$repo/.venv-az}"
python="${PYTHON:-python3}"
# Pinned: the tests follow the requests this version makes. Bump it here and run the az tests.
pin="azure-cli==2.91.0"
stamp="$venv/.kagi-az.pin"

if [[ -x "$venv/bin/az" && "$(cat "$stamp" 2>/dev/null || true)" == "$pin" ]]; then
    exit 0
fi
echo "az-venv.sh: (re)creating the az CLI venv at $venv ($pin)" >&2
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$pin"
# A smoke run: az starts and knows its version (a broken install fails here, not in every test).
smoke="$(mktemp -d)"
trap 'rm -rf "$smoke"' EXIT
AZURE_CONFIG_DIR="$smoke" AZURE_CORE_COLLECT_TELEMETRY=false "$venv/bin/az" version --output none
echo "$pin" > "$stamp"

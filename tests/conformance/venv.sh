#!/usr/bin/env bash
# Makes (or refreshes, when requirements.txt changed) the Python venv the tests use: the Azure SDK
# for the conformance suite, psycopg for the SQL tests (Rust and Python). Prints nothing.
# Env: KAGI_VENV (default <repo>/.venv), KAGI_VENV_REQUIREMENTS (default requirements.txt here: another
# venv from another file, as openapi-venv.sh makes), PYTHON (default python3).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${KAGI_VENV:-$repo/.venv}"
req="${KAGI_VENV_REQUIREMENTS:-$here/requirements.txt}"
stamp="$venv/.kagi-requirements.sha256"
python="${PYTHON:-python3}"

want="$(sha256sum "$req" | cut -d' ' -f1)"
have="$(cat "$stamp" 2>/dev/null || true)"
if [[ ! -x "$venv/bin/python" || "$want" != "$have" ]]; then
    echo "venv.sh: (re)creating venv at $venv" >&2
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
    echo "$want" > "$stamp"
fi

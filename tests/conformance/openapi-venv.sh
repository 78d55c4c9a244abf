#!/usr/bin/env bash
# Makes (or refreshes, when requirements-openapi.txt changed) the venv holding schemathesis for
# test_openapi.py: a venv of its own (venv.sh with another requirements file), so its pins never
# touch the Azure SDK's. Prints nothing when it is there. The CLI is "$KAGI_OPENAPI_VENV/bin/st".
# Env: KAGI_OPENAPI_VENV (default <repo>/.venv-openapi), PYTHON (default python3).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
KAGI_VENV="${KAGI_OPENAPI_VENV:-$repo/.venv-openapi}" \
    KAGI_VENV_REQUIREMENTS="$here/requirements-openapi.txt" \
    exec "$here/venv.sh"

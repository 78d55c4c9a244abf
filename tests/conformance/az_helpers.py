"""Running the real az CLI (azure-cli from PyPI, in its own venv made by scripts/az-venv.sh)
against a kagi server: one AZURE_CONFIG_DIR per test, the cloud registered from kagi's
`/metadata/endpoints`, signed in as the bootstrap administrator.

az talks to nothing but the server: MSAL's instance discovery (login.microsoftonline.com) is
turned off with core.instance_discovery=false, telemetry and survey prompts too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
AZ_VENV = Path(os.environ.get("KAGI_AZ_VENV", str(REPO / ".venv-az")))
AZ_BIN = AZ_VENV / "bin" / "az"
CLOUD = "kagi"


def az_missing_reason() -> Optional[str]:
    """Why the az tests cannot run here, or None. Printed loudly when they are skipped."""
    if AZ_BIN.exists():
        return None
    return (
        f"THE az CLI TESTS ARE SKIPPED: no az at {AZ_BIN}. scripts/az-venv.sh installs it "
        "(tests/conformance/run.sh runs it); set KAGI_AZ_VENV to use another venv."
    )


def require_az() -> None:
    reason = az_missing_reason()
    if reason:
        print(f"\n{'!' * 100}\n{reason}\n{'!' * 100}", file=sys.stderr)
        pytest.skip(reason)


class AzError(AssertionError):
    pass


class Az:
    """The az CLI against one kagi server, with its own config directory."""

    def __init__(self, srv, config_dir: Path):
        self.srv = srv
        self.config_dir = Path(config_dir)
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.env: Dict[str, str] = dict(os.environ)
        for k in list(self.env):
            # Nothing of the test venv's or the caller's Azure settings leaks into az.
            if k.startswith(("AZURE_", "MSAL_", "PYTHON")) or k in ("VIRTUAL_ENV",):
                self.env.pop(k)
        self.env.update(
            {
                "AZURE_CONFIG_DIR": str(self.config_dir),
                "REQUESTS_CA_BUNDLE": str(srv.ca_path),
                "SSL_CERT_FILE": str(srv.ca_path),
                "AZURE_CORE_INSTANCE_DISCOVERY": "false",
                "AZURE_CORE_COLLECT_TELEMETRY": "false",
                "AZURE_CORE_SURVEY_MESSAGE": "false",
                "AZURE_CORE_NO_COLOR": "true",
                "AZURE_CORE_ONLY_SHOW_ERRORS": "true",
                "AZURE_CORE_DISABLE_PROGRESS_BAR": "true",
            }
        )

    def run(self, *args: str, expect: int = 0, timeout: float = 120) -> subprocess.CompletedProcess:
        """Runs `az ARGS --output json`; fails the test unless the exit code is `expect`."""
        cmd = [str(AZ_BIN), *args, "--output", "json"]
        p = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout)
        if p.returncode != expect:
            raise AzError(
                f"`az {' '.join(args)}` exited {p.returncode}, expected {expect}\n"
                f"--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}"
            )
        return p

    def json(self, *args: str) -> Any:
        """Runs az and parses its JSON output (None for no output)."""
        out = self.run(*args).stdout.strip()
        if not out:
            return None
        try:
            return json.loads(out)
        except ValueError:
            raise AzError(f"`az {' '.join(args)}` did not print JSON:\n{out[:3000]}")

    def fails(self, *args: str, expect: int) -> str:
        """Runs az expecting exit code `expect` (az: 1 error, 2 usage, 3 not found); returns stderr."""
        return self.run(*args, expect=expect).stderr

    def sign_in(self) -> "Az":
        """Registers the cloud from kagi's metadata and signs in as the bootstrap administrator."""
        self.run("cloud", "register", "--name", CLOUD, "--endpoint-resource-manager", f"{self.srv.base}/")
        self.run("cloud", "set", "--name", CLOUD)
        admin = self.srv.admin
        self.run(
            "login",
            "--service-principal",
            "--username",
            admin["clientId"],
            "--password",
            admin["clientSecret"],
            "--tenant",
            admin["tenantId"],
        )
        return self

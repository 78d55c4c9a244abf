"""scripts/s3.sh, the S3 server later tests use (issue 14): moto's server on a free local port
with one bucket; the AWS_* lines it prints are enough to sign requests; it refuses a second
create of one object (If-None-Match: *), as kagi's blob root requires; stop and destroy are
idempotent."""

import os
import subprocess
import sys
import tempfile
import urllib.error
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "s3.sh"
sys.path.insert(0, str(REPO / "tests" / "conformance"))


def harness(*args: str) -> str:
    done = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"s3.sh {args}: {done.stderr}"
    return done.stdout


def test_start_env_conditional_create_and_teardown(monkeypatch):
    from conftest import S3Bucket

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "s3"
        env = dict(line.split("=", 1) for line in harness("start", str(d)).splitlines() if "=" in line)
        try:
            assert env["S3_BLOBS_URL"].startswith("s3://"), env
            assert harness("env", str(d)).splitlines() == [f"{k}={v}" for k, v in env.items()]
            for k, v in env.items():
                monkeypatch.setenv(k, v)
            bucket = S3Bucket.from_url(env["S3_BLOBS_URL"] + "/harness")
            put = lambda extra: bucket._request("PUT", "harness/one", {}, b"body", extra)
            put({"If-None-Match": "*"})
            assert bucket.get("one") == b"body"
            assert bucket.list() == ["one"]
            try:
                put({"If-None-Match": "*"})
                raise AssertionError("a second create of one object was accepted")
            except urllib.error.HTTPError as e:
                assert e.code == 412, e.code
            assert bucket.get("one") == b"body"
        finally:
            harness("stop", str(d))
            harness("stop", str(d))
            harness("destroy", str(d))
            harness("destroy", str(d))
        assert not d.exists()

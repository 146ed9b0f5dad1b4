"""Shared pytest configuration. Fixture modules live in tests/fixtures/ and are registered here."""
import os
import subprocess
import sys
from pathlib import Path

# Keep Ray and MLflow quiet and local in every test process.
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.mlflow_server",
    "tests.fixtures.outage",
    "tests.fixtures.browser",
]


def pytest_configure(config):
    # `ray start --head` with RAY_AUTH_MODE=token (what the job-submit tests do, like the README) needs a token
    # to exist already; only `ray.init()` creates one by itself. On a fresh machine, make it the way the
    # README tells users to: `ray get-auth-token --generate` (writes ~/.ray/auth_token if missing).
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    if not (Path.home() / ".ray" / "auth_token").exists():
        ray_cli = Path(sys.executable).parent / "ray"
        subprocess.run([str(ray_cli), "get-auth-token", "--generate"], capture_output=True, timeout=120, check=True)

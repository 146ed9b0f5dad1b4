"""Shared pytest configuration. Fixture modules live in tests/fixtures/ and are registered here."""
import os

# Keep Ray and MLflow quiet and local in every test process.
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.mlflow_server",
]

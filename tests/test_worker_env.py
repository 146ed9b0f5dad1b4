"""A training worker on a joined cluster gets every variable in envvars.FORWARDED_ENV.

Ray workers inherit the driver's environment only when the driver started the local Ray itself.
Here the cluster is a `ray start --head` whose environment lacks all of them, as on a cluster
started elsewhere; the driver (this process) has them, and ray_train must forward them.
"""
import json
from pathlib import Path

import pytest

from tests.helpers_ray import ray_head

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _env_loop(out_path: str):
    """A worker loop that only writes down the worker's environment."""

    def loop(config):
        import os

        Path(out_path).write_text(json.dumps(dict(os.environ)))

    return loop


def test_training_worker_on_a_joined_cluster_sees_every_forwarded_variable(tmp_path, tmp_path_factory, monkeypatch):
    from raytimm.config import load_config
    from raytimm.data.demo import make_demo_dataset
    from raytimm.envvars import FORWARDED_ENV
    from raytimm.ray_train import train

    # Distinct values, so an inherited default could not pass for a forwarded one.
    booleans = {"TQDM_DISABLE": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    expected = {name: booleans.get(name, f"http://127.0.0.1:9/raytimm-test/{name.lower()}") for name in FORWARDED_ENV}
    for name, value in expected.items():
        monkeypatch.setenv(name, value)
    assert "AWS_ENDPOINT_URL_S3" in expected

    data = make_demo_dataset(str(tmp_path / "data"), classes=2, per_class=8, size=32, seed=0)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml", [
        f"data.path={data}", f"storage.path={tmp_path / 'runs'}", "run.name=env", "scaling.num_workers=1",
        "mlflow.enabled=false", "run.max_failures=0"])
    out = tmp_path / "worker-env.json"
    # A short temp path: Ray's socket paths under it must stay within the OS limit.
    with ray_head(1, tmp_path_factory.mktemp("ray"), unset_env=FORWARDED_ENV):
        train(cfg, train_loop=_env_loop(str(out)))
    seen = json.loads(out.read_text())
    assert {name: seen.get(name) for name in FORWARDED_ENV} == expected

"""Multi-node training without a shared filesystem: a simulated 2-node Ray cluster, data only in the bucket.

``ray.cluster_utils.Cluster`` starts two raylets on this machine (1 CPU each). Each node gets its own
``RAYTIMM_NODE_CACHE`` in its raylet environment, and ``data.cache_dir=$RAYTIMM_NODE_CACHE`` is expanded
on the worker's node, so the two nodes cache into separate folders exactly as two machines would.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.s3, pytest.mark.ray, pytest.mark.slow]


@pytest.fixture
def two_nodes(s3_env, tmp_path):
    """A head and a second node with 1 CPU each and separate node-local caches; credentials in their env."""
    import ray
    from ray.cluster_utils import Cluster

    caches = [tmp_path / "node-head-cache", tmp_path / "node-2-cache"]
    # s3_env has already put the fake credentials and AWS_ENDPOINT_URL in os.environ: the raylets
    # (and so the workers) inherit them, like nodes whose environment holds the keys.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "env_vars": {"RAYTIMM_NODE_CACHE": str(caches[0])}})
    try:
        cluster.add_node(num_cpus=1, env_vars={"RAYTIMM_NODE_CACHE": str(caches[1])})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING")
        try:
            yield caches
        finally:
            ray.shutdown()
    finally:
        cluster.shutdown()


def test_two_nodes_each_stage_their_own_copy_from_the_bucket(s3_env, two_nodes, tmp_path):
    """2 workers on 2 nodes (STRICT_SPREAD) train from a bucket dataset; each node staged it once."""
    import ray

    from raytimm import storage
    from raytimm.config import load_config
    from raytimm.data.demo import make_demo_dataset
    from raytimm.ray_train import train

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    assert "RAYTIMM_NODE_CACHE" not in os.environ  # only the nodes know their cache folders
    data = make_demo_dataset(str(tmp_path / "data"), classes=3, per_class=12, size=32, seed=2)
    storage.upload(data, s3_env.uri("ds"))
    remote = sorted(info.key for info in storage.list_files(s3_env.uri("ds")))

    cfg = load_config(str(ROOT / "configs" / "quickstart.yaml"), [
        "model.name=test_resnet", "model.img_size=32", "model.pretrained=false", "train.epochs=1",
        "train.batch_size=8", "train.warmup_epochs=0", "data.num_workers=0", "mlflow.enabled=false",
        "run.max_failures=0", "scaling.num_workers=2", "scaling.placement_strategy=STRICT_SPREAD",
        f"data.path={s3_env.uri('ds')}", f"storage.path={s3_env.uri('runs')}", "run.name=two-nodes",
        "data.cache_dir=$RAYTIMM_NODE_CACHE"])
    result = train(cfg)

    assert result.best_checkpoint == s3_env.uri("runs/two-nodes/checkpoint_000001")
    assert storage.exists(result.best_checkpoint + "/meta.json")
    meta = json.loads(storage.read_text(result.best_checkpoint + "/meta.json"))
    assert meta["config"]["data"]["path"] == s3_env.uri("ds")  # the URI, not one node's cache folder
    for cache in two_nodes:  # one complete copy per node
        staged = [p for p in (cache / "datasets").iterdir() if p.is_dir()]
        assert len(staged) == 1, f"{cache}: {staged}"
        files = sorted(p.relative_to(staged[0]).as_posix() for p in staged[0].rglob("*") if p.is_file())
        assert files == remote, cache
        manifest = json.loads(Path(f"{staged[0]}.manifest.json").read_text())
        assert manifest["uri"] == s3_env.uri("ds") and sorted(manifest["objects"]) == remote
    assert not (ROOT / "$RAYTIMM_NODE_CACHE").exists()

"""`ray job submit --working-dir . -- raytimm train ...` against a real `ray start --head` on loopback."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real head node on 127.0.0.1 with the dashboard (job server) on a free port."""
    temp = tmp_path_factory.mktemp("rayhead")
    gcs, dash = _free_port(), _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "2",
           "--include-dashboard", "true", "--disable-usage-stats", "--temp-dir", str(temp)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            s = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                               capture_output=True, text=True, timeout=60)
            if s.returncode == 0:
                break
            time.sleep(2)
        yield address, env
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_ray_job_submit_trains_quickstart(ray_head, tmp_path):
    from raytimm.data.demo import make_demo_dataset

    address, env = ray_head
    data = make_demo_dataset(str(tmp_path / "data"), classes=3, per_class=12, size=32, seed=1)
    runs = tmp_path / "runs"
    result_json = tmp_path / "result.json"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
           str(BIN / "raytimm"), "train", "--config", "configs/quickstart.yaml", f"data.path={data}",
           f"storage.path={runs}", "run.name=submitted", "train.epochs=1", "scaling.num_workers=1",
           "mlflow.enabled=false", "--result-json", str(result_json)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "succeeded" in out.lower()
    result = json.loads(result_json.read_text())
    assert result["run_dir"] == str(runs / "submitted")
    best = Path(result["best_checkpoint"])
    assert (best / "model.safetensors").is_file() and (best / "meta.json").is_file()
    assert json.loads((runs / "submitted" / "best").read_text())["checkpoint"]

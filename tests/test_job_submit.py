"""`ray job submit --working-dir . -- raytimm train ...` against a real `ray start --head` on loopback."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers_net import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.slow]



@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real head node on 127.0.0.1 with the dashboard (job server) on a free port."""
    temp = tmp_path_factory.mktemp("rayhead")
    gcs, dash = free_port(), free_port()
    # `ray start` turns token auth on and keeps the token in ~/.ray/auth_token; the `ray job`
    # CLI of Ray 2.60 only sends it when RAY_AUTH_MODE=token (README documents this).
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
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
        _stop_head(str(temp))


def _pids_with(needle: str) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path("/proc", d, "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if needle in cmd and int(d) != os.getpid():
            pids.append(int(d))
    return pids


def _stop_head(temp_dir: str) -> None:
    """Stop only this head's processes (`ray stop` would stop every Ray on the machine)."""
    import signal

    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        for pid in _pids_with(temp_dir):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + wait
        while _pids_with(temp_dir) and time.time() < deadline:
            time.sleep(0.5)


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

"""How fast `/inference/quick` refuses models it must not build, and what the refusals cost in memory.

    python benchmarks/serve_guard.py            # 8 concurrent giant/bogus model_name requests, 3 rounds

Starts `raytimm serve` (its own local Ray) on a small trained checkpoint with a weights folder holding
the test model and a fake `convnext_xxlarge.safetensors` (allowed, but over --max-model-params; never
read). Each round sends 8 concurrent requests (not allowed, too large, no weights, not timm names) and
records each one's time to its 4xx. Round 1 is cold (the model replica sizes the models it has not
seen on the meta device); later rounds are warm. Baseline in the same run: a 200 `/predict` of one image.
Resident memory (VmRSS) of the model replica and the ingress before and after.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers_net import free_port  # noqa: E402
from tests.helpers_ray import session_pids, stop_session  # noqa: E402
from tests.test_predict import color_image, make_trained_checkpoint, png_bytes  # noqa: E402

ASKS = {
    "vit_gigantic_patch14_clip_224": 422, "eva02_enormous_patch14_clip_224": 422, "vit_huge_patch14_clip_224": 422,
    "convnext_xxlarge": 422, "resnet34": 404, "resnet18;rm -rf /": 422, "resnet18 && curl evil": 422,
    "not_a_model_at_all": 422,
}


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1)) / 1024


def ingress_pid(sid: int) -> int:
    """The Ingress replica among the processes of the server's own session (its process title names it)."""
    for pid in session_pids(sid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "ServeReplica:raytimm:Ingress" in cmd:
            return pid
    raise RuntimeError("no Ingress replica in the server's session")


def main() -> int:
    import safetensors.torch
    import timm

    work = Path(tempfile.mkdtemp(prefix="serve_guard_"))
    make_trained_checkpoint(work / "runs" / "run1")
    weights = work / "weights"
    weights.mkdir()
    safetensors.torch.save_file(timm.create_model("test_resnet").state_dict(), str(weights / "test_resnet.safetensors"))
    (weights / "convnext_xxlarge.safetensors").write_bytes(b"never read")
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAYTIMM_API_TOKEN", None)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "raytimm"), "serve", "--checkpoint",
                             str(work / "runs" / "run1"), "--port", str(port), "--num-cpus", "1",
                             "--weights-dir", str(weights)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for line in proc.stdout:
            if "serving" in line:
                break
        s = requests.Session()
        png = png_bytes(color_image("red"))
        files = [("file", ("x.png", png, "image/png"))]
        model_pid = s.get(url + "/model", timeout=60).json()["pid"]
        ing_pid = ingress_pid(proc.pid)
        base = []
        for _ in range(10):
            t = time.perf_counter()
            assert s.post(url + "/predict", files=files, timeout=60).status_code == 200
            base.append(time.perf_counter() - t)
        before = (rss_mib(model_pid), rss_mib(ing_pid))
        print(f"baseline: 200 /predict of one image, median of 10: {statistics.median(base) * 1000:.0f} ms")

        def ask(name):
            t = time.perf_counter()
            r = requests.post(url + "/inference/quick", files=files, data={"model_name": name}, timeout=300)
            assert r.status_code == ASKS[name], (name, r.status_code, r.text)
            return time.perf_counter() - t

        for round_no in (1, 2, 3):
            with cf.ThreadPoolExecutor(len(ASKS)) as pool:
                took = dict(zip(ASKS, pool.map(ask, ASKS)))
            worst = max(took.values())
            print(f"round {round_no} ({'cold' if round_no == 1 else 'warm'}): 8 concurrent refusals, "
                  f"slowest {worst * 1000:.0f} ms ({worst / statistics.median(base):.1f}x baseline), median "
                  f"{statistics.median(took.values()) * 1000:.0f} ms")
            for name, sec in took.items():
                print(f"    {ASKS[name]}  {sec * 1000:7.0f} ms  {name}")
        after = (rss_mib(model_pid), rss_mib(ing_pid))
        print(f"model replica VmRSS: {before[0]:.0f} -> {after[0]:.0f} MiB ({after[0] / before[0] - 1:+.1%})")
        print(f"ingress VmRSS:       {before[1]:.0f} -> {after[1]:.0f} MiB ({after[1] / before[1] - 1:+.1%}; "
              f"no timm/torch there)")
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pass
        stop_session(proc.pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Closed-loop load against `raytimm serve`, beside two references measured in the same run.

    python benchmarks/serve_load.py            # resnet18 @ 224 px, CPU, concurrency 1/8/32
    python benchmarks/serve_load.py --quick    # short smoke run (a few seconds per level)

References (same model, same torch threads as one replica):
- raw batched forward throughput (images/s at the server's max batch size): the upper bound;
- per-request model rebuild (create + load weights + preprocess + forward for every request), as the
  platform's earlier service did: the floor.

Targets (issue 6): req/s at concurrency 32 >= 0.7x the raw batched throughput; p99 <= 3x p50.
Each request carries one 224-ish JPEG. Client threads run on the same machine, so on a small box
they compete with the server for CPU; the ratios printed are what this machine gave.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import requests
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.loadgen import photo_like  # noqa: E402
from tests.helpers_net import free_port  # noqa: E402


def make_checkpoint(model_name: str, num_classes: int, out_dir: str) -> str:
    """A randomly initialised checkpoint (weights do not change speed) with the model's 224 px data config."""
    import timm

    from raytimm.checkpoint import save_checkpoint, write_best_pointer
    from raytimm.data.transforms import resolve_data_config

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes).eval()
    path = os.path.join(out_dir, "bench_run", "checkpoint_000000")
    save_checkpoint(path, model_state=model.state_dict(), meta={
        "model_name": model_name, "num_classes": num_classes,
        "class_names": [f"class_{i}" for i in range(num_classes)],
        "data_config": resolve_data_config(model), "epoch": 0, "metrics": {}})
    write_best_pointer(os.path.join(out_dir, "bench_run"), path, {})
    return path


def sample_jpeg(seed: int = 0, size=(256, 256)) -> bytes:
    """A photo-like JPEG (smooth gradients plus noise) of about the size clients send."""
    return photo_like(seed, size, "JPEG")


def raw_batched_throughput(checkpoint: str, threads: int, batch_size: int, seconds: float) -> float:
    """Images/s of the bare forward pass at the server's batch size (the upper bound)."""
    from raytimm.predict import Predictor

    torch.set_num_threads(threads)
    pred = Predictor.from_checkpoint(checkpoint, device="cpu")
    x = torch.stack([pred.preprocess(np.zeros((224, 224, 3), np.uint8))] * batch_size)
    pred.logits(x)  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n == 0:
        pred.logits(x)
        n += batch_size
    return n / (time.perf_counter() - start)


def rebuild_per_request_rate(checkpoint: str, threads: int, image: bytes, repeats: int) -> float:
    """Requests/s when every request rebuilds the model from the checkpoint first (the floor)."""
    from raytimm.predict import Predictor

    torch.set_num_threads(threads)
    start = time.perf_counter()
    for _ in range(repeats):
        Predictor.from_checkpoint(checkpoint, device="cpu").predict([image], top_k=5)
    return repeats / (time.perf_counter() - start)


def start_server(checkpoint: str, port: int, num_cpus: float, max_batch_size: int, batch_wait_ms: float,
                 log_path: str, extra_args: Sequence[str] = ()) -> subprocess.Popen:
    """`raytimm serve` as a subprocess (the real CLI, plus ``extra_args``); returns once /healthz answers."""
    exe = shutil.which("raytimm", path=os.path.dirname(sys.executable)) or shutil.which("raytimm")
    cmd = [exe] if exe else [sys.executable, "-c", "import sys; from raytimm.cli import main; sys.exit(main())"]
    cmd += ["serve", "--checkpoint", checkpoint, "--port", str(port), "--num-cpus", str(num_cpus),
            "--max-batch-size", str(max_batch_size), "--batch-wait-ms", str(batch_wait_ms), *extra_args]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.pop("RAYTIMM_API_TOKEN", None)
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"raytimm serve exited with {proc.returncode}; see {log_path}")
        try:
            if requests.get(url + "/healthz", timeout=2).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        time.sleep(1)
    stop_server(proc)
    raise SystemExit(f"raytimm serve did not become healthy; see {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    """Ctrl-C the server (it shuts Serve and Ray down), then make sure it is gone."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def closed_loop(url: str, image: bytes, concurrency: int, seconds: float, warmup: float) -> dict:
    """`concurrency` clients, each sending its next request as soon as the last one is answered."""
    stop_at = time.perf_counter() + warmup + seconds
    measure_from = time.perf_counter() + warmup
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def client():
        s = requests.Session()
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            r = s.post(url + "/predict", files=[("file", ("img.jpg", image, "image/jpeg"))], data={"top_k": "5"},
                       timeout=120)
            t1 = time.perf_counter()
            with lock:
                if r.status_code != 200:
                    errors[0] += 1
                elif measure_from <= t1 <= stop_at:
                    # Closed-loop throughput: completions inside the measured window.
                    latencies.append(t1 - t0)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat = sorted(latencies)

    def pct(p):
        return lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))] * 1000 if lat else float("nan")

    return {"concurrency": concurrency, "requests": len(lat), "errors": errors[0],
            "rps": len(lat) / seconds, "p50": pct(50), "p95": pct(95), "p99": pct(99),
            "mean": statistics.fmean(lat) * 1000 if lat else float("nan")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=30.0, help="measured seconds per concurrency level")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--num-cpus", type=float, default=None,
                   help="CPUs (= torch threads) of the one model replica; default: cores - 1")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--rebuild-repeats", type=int, default=10)
    p.add_argument("--url", help="measure an already running server instead of starting one")
    p.add_argument("--quick", action="store_true", help="short run: 4 s per level, 1 s warm-up, 3 rebuilds")
    a = p.parse_args(argv)
    if a.quick:
        a.seconds, a.warmup, a.rebuild_repeats = 4.0, 1.0, 3
    cores = os.cpu_count() or 1
    num_cpus = a.num_cpus if a.num_cpus is not None else max(1, cores - 1)
    threads = max(1, int(round(num_cpus)))

    work = tempfile.mkdtemp(prefix="raytimm-bench-")
    try:
        checkpoint = make_checkpoint(a.model, a.num_classes, work)
        image = sample_jpeg()
        print(f"model {a.model} @224 px, {a.num_classes} classes, CPU, torch threads {threads}, "
              f"max batch {a.max_batch_size}, batch wait {a.batch_wait_ms} ms, {cores} cores", flush=True)
        # References first, with the server not yet competing for the CPUs.
        raw = raw_batched_throughput(checkpoint, threads, a.max_batch_size, seconds=min(a.seconds, 10.0))
        floor = rebuild_per_request_rate(checkpoint, threads, image, a.rebuild_repeats)
        print(f"raw batched forward: {raw:8.1f} img/s   per-request rebuild: {floor:6.2f} req/s", flush=True)

        proc = None
        url = a.url
        if not url:
            port = free_port()
            proc = start_server(checkpoint, port, num_cpus, a.max_batch_size, a.batch_wait_ms,
                                os.path.join(work, "serve.log"))
            url = f"http://127.0.0.1:{port}"
        try:
            rows = [closed_loop(url, image, c, a.seconds, a.warmup) for c in a.concurrency]
        finally:
            if proc is not None:
                stop_server(proc)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>6} "
          f"{'x raw':>6} {'x rebuild':>9} {'p99/p50':>7}")
    for r in rows:
        print(f"{r['concurrency']:>4} {r['rps']:>8.1f} {r['p50']:>8.1f} {r['p95']:>8.1f} {r['p99']:>8.1f} "
              f"{r['errors']:>6} {r['rps'] / raw:>6.2f} {r['rps'] / floor:>9.1f} {r['p99'] / r['p50']:>7.2f}")
    top = rows[-1]
    print(f"\ntarget at concurrency {top['concurrency']}: >= 0.70x raw -> {top['rps'] / raw:.2f}x; "
          f"p99 <= 3x p50 -> {top['p99'] / top['p50']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Closed-loop load against `raytimm serve` with each backend, beside references measured in the same run.

    python benchmarks/serve_load.py            # resnet18 @ 224 px, CPU, torch and onnx, concurrency 1/8/32
    python benchmarks/serve_load.py --quick    # short smoke run (a few seconds per level)
    python benchmarks/serve_load.py --backends torch --device cuda --json out.json   # one backend, on a GPU

Both backends are served one after the other with the same replica CPUs, batching and image.
References (same model, same threads as one replica):
- raw batched forward throughput of each backend (images/s at the server's max batch size): the upper bound;
- per-request model rebuild (create + load weights + preprocess + forward for every request, eager
  PyTorch), as the platform's earlier service did: the floor.

Targets: issue 6: req/s at concurrency 32 >= 0.7x the raw batched throughput; p99 <= 3x p50.
issue 11: at concurrency 32 on CPU, onnx >= 1.5x torch and >= 5x the rebuild floor.
Each request carries one 224-ish JPEG. Client threads run on the same machine, so on a small box
they compete with the server for CPU; the ratios printed are what this machine gave.
"""
from __future__ import annotations

import argparse
import json
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


def raw_batched_throughput(checkpoint: str, threads: int, batch_size: int, seconds: float, *,
                           backend: str = "torch", device: str | None = "cpu", cache_dir: str | None = None) -> float:
    """Images/s of the bare forward pass of ``backend`` at the server's batch size (the upper bound)."""
    from raytimm.predict import Predictor

    torch.set_num_threads(threads)
    if backend == "onnx" and device == "cuda":
        device = None  # ONNX Runtime's CUDA provider when this onnxruntime has it, else its CPU one (a warning)
    pred = Predictor.from_checkpoint(checkpoint, device=device, backend=backend, num_threads=threads,
                                     cache_dir=cache_dir)
    x = torch.stack([pred.preprocess(np.zeros((224, 224, 3), np.uint8))] * batch_size)
    pred.logits(x)  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n == 0:
        pred.logits(x)
        n += batch_size
    return n / (time.perf_counter() - start)


def rebuild_per_request_rate(checkpoint: str, threads: int, image: bytes, repeats: int, device: str = "cpu") -> float:
    """Requests/s when every request rebuilds the model from the checkpoint first (the floor)."""
    from raytimm.predict import Predictor

    torch.set_num_threads(threads)
    start = time.perf_counter()
    for _ in range(repeats):
        Predictor.from_checkpoint(checkpoint, device=device).predict([image], top_k=5)
    return repeats / (time.perf_counter() - start)


def start_server(checkpoint: str, port: int, num_cpus: float, max_batch_size: int, batch_wait_ms: float,
                 log_path: str, extra_args: Sequence[str] = (), env_extra: dict | None = None) -> subprocess.Popen:
    """`raytimm serve` as a subprocess (the real CLI, plus ``extra_args``); returns once /healthz answers."""
    exe = shutil.which("raytimm", path=os.path.dirname(sys.executable)) or shutil.which("raytimm")
    cmd = [exe] if exe else [sys.executable, "-c", "import sys; from raytimm.cli import main; sys.exit(main())"]
    cmd += ["serve", "--checkpoint", checkpoint, "--port", str(port), "--num-cpus", str(num_cpus),
            "--max-batch-size", str(max_batch_size), "--batch-wait-ms", str(batch_wait_ms), *extra_args]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.pop("RAYTIMM_API_TOKEN", None)
    env.update(env_extra or {})
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


def serve_backend(checkpoint: str, backend: str, *, image: bytes, concurrency: Sequence[int], seconds: float,
                  warmup: float, num_cpus: float, num_gpus: float, max_batch_size: int, batch_wait_ms: float,
                  work: str) -> dict:
    """Start `raytimm serve --backend B`, run the closed loop at each concurrency, stop it."""
    port = free_port()
    # The replica exports into this node cache; the raw onnx reference filled it already (same content key).
    proc = start_server(checkpoint, port, num_cpus, max_batch_size, batch_wait_ms,
                        os.path.join(work, f"serve-{backend}.log"),
                        extra_args=["--backend", backend, "--num-gpus", str(num_gpus)],
                        env_extra={"RAYTIMM_CACHE_DIR": os.path.join(work, "cache")})
    url = f"http://127.0.0.1:{port}"
    try:
        model = requests.get(url + "/model", timeout=30).json()
        rows = [closed_loop(url, image, c, seconds, warmup) for c in concurrency]
    finally:
        stop_server(proc)
    described = {k: model.get(k) for k in ("backend", "device", "providers", "threads")}
    return {"server": described, "levels": rows}


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def ratios(result: dict) -> list[dict]:
    """Per concurrency: onnx/torch req/s, each backend over the rebuild floor and its raw bound, p99/p50."""
    floor = result["rebuild_floor_rps"]
    by_backend = {b: {r["concurrency"]: r for r in v["levels"]} for b, v in result["backends"].items()}
    out = []
    for c in result["concurrency"]:
        row: dict = {"concurrency": c}
        for b, levels in by_backend.items():
            r = levels[c]
            row[f"{b}_over_floor"] = _ratio(r["rps"], floor)
            row[f"{b}_over_raw"] = _ratio(r["rps"], result["raw_batched_ips"][b])
            row[f"{b}_p99_over_p50"] = _ratio(r["p99"], r["p50"])
        if {"torch", "onnx"} <= set(by_backend):
            row["onnx_over_torch"] = _ratio(by_backend["onnx"][c]["rps"], by_backend["torch"][c]["rps"])
        out.append(row)
    return out


def print_report(result: dict) -> None:
    """Per-backend tables, then the ratios and the targets at the highest concurrency."""
    floor = result["rebuild_floor_rps"]
    for backend, v in result["backends"].items():
        raw = result["raw_batched_ips"][backend]
        print(f"\n{backend}: {v['server']}")
        print(f"{'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>6} "
              f"{'x raw':>6} {'x rebuild':>9} {'p99/p50':>7}")
        for r in v["levels"]:
            print(f"{r['concurrency']:>4} {r['rps']:>8.1f} {r['p50']:>8.1f} {r['p95']:>8.1f} {r['p99']:>8.1f} "
                  f"{r['errors']:>6} {_ratio(r['rps'], raw):>6.2f} {_ratio(r['rps'], floor):>9.1f} "
                  f"{_ratio(r['p99'], r['p50']):>7.2f}")
    print("\nratios per concurrency:")
    for row in result["ratios"]:
        print("  " + "  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    top = result["ratios"][-1]
    if "onnx_over_torch" in top:
        print(f"\ntargets at concurrency {top['concurrency']}: onnx >= 1.5x torch -> {top['onnx_over_torch']:.2f}x; "
              f"onnx >= 5x rebuild floor -> {top['onnx_over_floor']:.2f}x; "
              f"p99 <= 3x p50 -> torch {top['torch_p99_over_p50']:.2f}x, onnx {top['onnx_p99_over_p50']:.2f}x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--backends", nargs="+", choices=["torch", "onnx"], default=["torch", "onnx"])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: references on the GPU and each replica given --num-gpus 1")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=30.0, help="measured seconds per concurrency level")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--num-cpus", type=float, default=None,
                   help="CPUs (= torch / ONNX Runtime threads) of the one model replica; default: cores - 1")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--rebuild-repeats", type=int, default=10)
    p.add_argument("--json", help="also write every figure here")
    p.add_argument("--quick", action="store_true", help="short run: 4 s per level, 1 s warm-up, 3 rebuilds")
    a = p.parse_args(argv)
    if a.quick:
        a.seconds, a.warmup, a.rebuild_repeats = 4.0, 1.0, 3
    cores = os.cpu_count() or 1
    num_cpus = a.num_cpus if a.num_cpus is not None else max(1, cores - 1)
    threads = max(1, int(round(num_cpus)))
    num_gpus = 1.0 if a.device == "cuda" else 0.0

    work = tempfile.mkdtemp(prefix="raytimm-bench-")
    try:
        checkpoint = make_checkpoint(a.model, a.num_classes, work)
        image = sample_jpeg()
        print(f"model {a.model}, {a.num_classes} classes, {a.device}, replica CPUs/threads {threads}, "
              f"max batch {a.max_batch_size}, batch wait {a.batch_wait_ms} ms, {cores} cores, "
              f"backends {' '.join(a.backends)}", flush=True)
        result: dict = {"model": a.model, "device": a.device, "threads": threads, "num_cpus": num_cpus,
                        "max_batch_size": a.max_batch_size, "batch_wait_ms": a.batch_wait_ms,
                        "seconds": a.seconds, "concurrency": list(a.concurrency), "cores": cores,
                        "load_before": os.getloadavg(), "raw_batched_ips": {}, "backends": {}}
        # References first, with no server competing for the CPUs.
        for backend in a.backends:
            result["raw_batched_ips"][backend] = raw_batched_throughput(
                checkpoint, threads, a.max_batch_size, seconds=min(a.seconds, 10.0), backend=backend,
                device=a.device, cache_dir=os.path.join(work, "cache"))
        result["rebuild_floor_rps"] = rebuild_per_request_rate(checkpoint, threads, image, a.rebuild_repeats,
                                                               device=a.device)
        print("raw batched forward: " + ", ".join(f"{b} {v:.1f} img/s" for b, v in result["raw_batched_ips"].items())
              + f"   per-request rebuild: {result['rebuild_floor_rps']:.2f} req/s", flush=True)
        for backend in a.backends:
            result["backends"][backend] = serve_backend(
                checkpoint, backend, image=image, concurrency=a.concurrency, seconds=a.seconds, warmup=a.warmup,
                num_cpus=num_cpus, num_gpus=num_gpus, max_batch_size=a.max_batch_size,
                batch_wait_ms=a.batch_wait_ms, work=work)
            print(f"{backend}: done", flush=True)
        result["load_after"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["ratios"] = ratios(result)
    print_report(result)
    print(f"\nload average before {result['load_before'][0]:.2f}, after {result['load_after'][0]:.2f}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

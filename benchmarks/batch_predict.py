"""Batch prediction images/s: a plain single-process loop vs `raytimm predict` on Ray Data (issue 12).

    python benchmarks/batch_predict.py                       # 2,000 JPEGs, resnet18 @ 224 px, CPU
    python benchmarks/batch_predict.py --images 400          # a shorter run on a busy machine
    python benchmarks/batch_predict.py --quick               # smoke run (64 images, test_resnet)

One run, the same files, model and eval transform for every side:

(a) a plain single-process loop: ``Predictor`` over the files with a torch DataLoader (decode with
    data/images.py + the checkpoint's eval transform in ``--loader-workers`` worker processes) and a
    batched forward (``Predictor.predict_tensor_batch``) in the main process with torch's default threads;
(b) ``batch_predict.predict_to_output`` (what `raytimm predict` runs) with 1 model actor that gets
    ``--actor-cpus`` CPUs (its torch threads) while decode tasks take ``--decode-cpus`` each;
(c) the same with the actor count this machine fits: ``--fit-actors`` (default: CPU cores), each with
    cores/actors CPUs, so that the model actors together use every core.

Timing: images/s = images / wall seconds of the prediction itself. For (a) that is from creating the
DataLoader iterator to the last batch; for (b) and (c) it is ``summary["seconds"]`` (from building the
Dataset to the last part file written: actor start-up, which loads the model, is inside it; Ray's own
start is not, and is printed apart). "first rows" is the time until the first results came back (for
(b)/(c): actor processes start, import torch and load the model); "steady" is images/s after that.
CPU utilisation = CPU seconds of this process and all its descendants (for Ray: raylet, GCS, workers
and actors, all started by this process) over wall seconds x cores, sampled from /proc every 0.5 s
(for (b)/(c) over the whole call, the driver's model load included). The load average is printed
before and after each side: this machine may be shared, so (a) runs a second time at the end and the
baseline is the mean of its two runs. On a loaded machine, images/s follows the CPU share the scheduler gave
each side; images per CPU-second (images / CPU seconds of the tree) compares the work each side needs.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402


NUM_CLASSES = 10


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _proc_table() -> tuple[dict[int, int], dict[int, float]]:
    """(parent of each pid, utime+stime seconds of each pid) from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    parent, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        parent[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    return parent, cpu


def tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds of root and each live descendant."""
    parent, cpu = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        found[pid] = cpu.get(pid, 0.0)
        todo.extend(children.get(pid, []))
    return found


class CpuMeter:
    """CPU seconds used by this process tree while it runs: /proc sampled every 0.5 s, so processes that
    start and exit in between (Ray actors, DataLoader workers) count up to their last sample."""

    def __init__(self, root: int):
        import threading

        self.root, self.first, self.last = root, tree_cpu(root), {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.last.update(tree_cpu(self.root))

    def stop(self) -> float:
        """Stop sampling; the CPU seconds used since start."""
        self._stop.set()
        self._thread.join()
        self.last.update(tree_cpu(self.root))
        return sum(v - self.first.get(pid, 0.0) for pid, v in self.last.items())


def make_jpegs(root: Path, n: int, size: tuple[int, int]) -> list[str]:
    """n deterministic photo-like JPEGs (smooth gradients + noise), size (w, h)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    paths = []
    for i in range(n):
        c = rng.integers(0, 256, (2, 3))
        t = ((xx + yy * (i % 7 + 1)) / (w + h * (i % 7 + 1)))[..., None]
        img = c[0] * (1 - t) + c[1] * t + rng.normal(0, 12, (h, w, 3))
        path = root / f"{i // 500:03d}" / f"img_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return sorted(paths)


def make_checkpoint(folder: Path, model_name: str, img_size: int) -> str:
    """A randomly initialised model saved as a raytimm checkpoint with timm's eval data config."""
    import timm

    from raytimm import checkpoint as ckpt
    from raytimm.data.transforms import resolve_data_config

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, num_classes=NUM_CLASSES)
    data_config = resolve_data_config(model, img_size=img_size)
    path = str(folder / "checkpoint")
    ckpt.save_checkpoint(path, model_state=model.state_dict(), meta={
        "model_name": model_name, "num_classes": NUM_CLASSES, "class_names": [f"c{i}" for i in range(NUM_CLASSES)],
        "data_config": data_config, "epoch": 0, "metrics": {}})
    return path


class _Files(torch.utils.data.Dataset):
    """Decode + eval transform in the loader workers: the plain baseline's data path."""

    def __init__(self, paths, transform, max_pixels):
        self.paths, self.transform, self.max_pixels = paths, transform, max_pixels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from raytimm.data.images import decode_image

        return self.transform(decode_image(self.paths[i], max_pixels=self.max_pixels))


def run_plain(checkpoint: str, paths: list[str], batch_size: int, workers: int) -> dict:
    """(a): Predictor + DataLoader in this process."""
    from raytimm.predict import Predictor

    pred = Predictor.from_checkpoint(checkpoint, device="cpu", batch_size=batch_size)
    loader = torch.utils.data.DataLoader(_Files(paths, pred.transform, pred.max_pixels), batch_size=batch_size,
                                         num_workers=workers, shuffle=False)
    before = loadavg()
    meter, t0 = CpuMeter(os.getpid()), time.monotonic()
    n, first = 0, None
    for batch in loader:
        n += len(pred.predict_tensor_batch(batch, 5))
        first = first or (time.monotonic(), n)
    end = time.monotonic()
    seconds = end - t0
    cpu = meter.stop()
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds, "first_rows_s": first[0] - t0,
            "steady_images_per_s": (n - first[1]) / (end - first[0]), "cpu_s": cpu, "images_per_cpu_s": n / cpu,
            "cpu_util": cpu / seconds / os.cpu_count(),
            "load_before": before, "load_after": loadavg(), "threads": torch.get_num_threads(), "workers": workers}


def run_ray(checkpoint: str, input_dir: str, output: str, *, concurrency: int, actor_cpus: float,
            decode_cpus: float, batch_size: int) -> dict:
    """(b)/(c): the `raytimm predict` pipeline on the Ray this process started."""
    from raytimm.batch_predict import predict_to_output

    before = loadavg()
    meter = CpuMeter(os.getpid())
    s = predict_to_output(checkpoint, input_dir, output, fmt="parquet", concurrency=concurrency, batch_size=batch_size,
                          cpus_per_actor=actor_cpus, decode_cpus=decode_cpus, shard_size=500)
    cpu = meter.stop()
    wall = s["total_seconds"]
    return {"images": s["predicted"], "seconds": s["seconds"], "images_per_s": s["images_per_s"],
            "first_rows_s": s["first_rows_s"], "steady_images_per_s": s["steady_images_per_s"], "cpu_s": cpu,
            "images_per_cpu_s": s["predicted"] / cpu, "total_seconds": wall, "cpu_util": cpu / wall / os.cpu_count(),
            "load_before": before, "load_after": loadavg(),
            "actors": concurrency, "actor_cpus": actor_cpus, "decode_cpus": decode_cpus, "errors": s["errors"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--source-size", default="320x240", help="JPEG size WxH (default 320x240)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--loader-workers", type=int, default=2)
    ap.add_argument("--actor-cpus", type=float, default=None, help="(b)'s actor CPUs (default cores - decode)")
    ap.add_argument("--decode-cpus", type=float, default=0.5)
    ap.add_argument("--fit-actors", type=int, default=None, help="(c)'s actor count (default: cores)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    if a.quick:
        a.images, a.model, a.img_size, a.source_size = 64, "test_resnet", 64, "96x80"
    cores = os.cpu_count()
    actor_cpus = a.actor_cpus if a.actor_cpus is not None else max(1.0, cores - a.decode_cpus)
    fit = a.fit_actors or cores
    fit_cpus = max(0.25, (cores - a.decode_cpus) / fit)

    from raytimm.logs import quiet_third_party

    quiet_third_party()
    os.environ.setdefault("TQDM_DISABLE", "1")
    work = Path(tempfile.mkdtemp(prefix="bench_bp_"))
    w, h = (int(v) for v in a.source_size.split("x"))
    t = time.monotonic()
    paths = make_jpegs(work / "images", a.images, (w, h))
    print(f"{a.images} JPEGs {w}x{h} written in {time.monotonic() - t:.1f}s; model {a.model} @ {a.img_size}px; "
          f"{cores} cores; torch {torch.__version__}; load {loadavg()}", flush=True)
    checkpoint = make_checkpoint(work, a.model, a.img_size)

    results = {}
    results["a"] = run_plain(checkpoint, paths, a.batch_size, a.loader_workers)
    print("(a) plain", json.dumps(results["a"]), flush=True)

    from raytimm.batch_predict import init_ray

    t = time.monotonic()
    init_ray()
    ray_start = time.monotonic() - t
    print(f"ray.init {ray_start:.1f}s", flush=True)
    results["b"] = run_ray(checkpoint, str(work / "images"), str(work / "out_b"), concurrency=1,
                           actor_cpus=actor_cpus, decode_cpus=a.decode_cpus, batch_size=a.batch_size)
    print("(b) 1 actor", json.dumps(results["b"]), flush=True)
    results["c"] = run_ray(checkpoint, str(work / "images"), str(work / "out_c"), concurrency=fit,
                           actor_cpus=fit_cpus, decode_cpus=a.decode_cpus, batch_size=a.batch_size)
    print(f"(c) {fit} actors", json.dumps(results["c"]), flush=True)
    import ray

    ray.shutdown()
    results["a2"] = run_plain(checkpoint, paths, a.batch_size, a.loader_workers)
    print("(a) plain, again", json.dumps(results["a2"]), flush=True)

    base = (results["a"]["images_per_s"] + results["a2"]["images_per_s"]) / 2
    steady = (results["a"]["steady_images_per_s"] + results["a2"]["steady_images_per_s"]) / 2
    per_cpu = (results["a"]["images_per_cpu_s"] + results["a2"]["images_per_cpu_s"]) / 2
    ratios = {"b/a": results["b"]["images_per_s"] / base, "c/a": results["c"]["images_per_s"] / base,
              "c/b": results["c"]["images_per_s"] / results["b"]["images_per_s"],
              "steady b/a": results["b"]["steady_images_per_s"] / steady,
              "steady c/a": results["c"]["steady_images_per_s"] / steady,
              "per-CPU-s b/a": results["b"]["images_per_cpu_s"] / per_cpu,
              "per-CPU-s c/a": results["c"]["images_per_cpu_s"] / per_cpu}
    print(f"\nbaseline (a) {base:.1f} images/s (mean of two runs)")
    for key, label in (("a", "(a) plain loop"), ("b", "(b) predict, 1 actor"), ("c", f"(c) predict, {fit} actors"),
                       ("a2", "(a) plain loop, again")):
        r = results[key]
        print(f"  {label:<26} {r['images_per_s']:7.1f} images/s  {r['seconds']:6.1f}s  first rows "
              f"{r['first_rows_s']:5.1f}s  steady {r['steady_images_per_s']:7.1f} images/s  "
              f"{r['images_per_cpu_s']:5.1f} images/CPU-s  CPU {100 * r['cpu_util']:5.1f}%  "
              f"load {r['load_before']} -> {r['load_after']}")
    print("  ratios " + "  ".join(f"{k} = {v:.2f}" for k, v in ratios.items()))
    if a.json:
        Path(a.json).write_text(json.dumps({
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
            "cores": cores, "images": a.images, "model": a.model, "img_size": a.img_size, "ray_init_s": ray_start,
            "results": results, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()

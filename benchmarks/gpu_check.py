"""The prepared GPU check: one script for a short GPU window (under 8 minutes on one GPU).

    benchmarks/gpu_check.sh                      # on a GPU machine; writes gpu_check.json
    benchmarks/gpu_check.sh --dry-run            # the same steps on CPU with tiny sizes (tests/test_gpu_check.py)

Steps (each one's failure is recorded in the JSON and the next one still runs):
1. ``env``: torch / CUDA / GPU names / ONNX Runtime providers.
2. ``tests``: the pytest subset marked ``gpu`` (tests/test_gpu.py: AMP bf16/fp16 + channels_last steps,
   GPU batching in the Predictor, DDP over NCCL with 2 workers when there are 2 GPUs).
3. ``train``: resnet50 at 224 px on synthetic JPEGs, a fixed number of steps per epoch, epoch 1 = warm-up,
   images/s = median of epochs 2..N: (a) a plain timm loop with AMP and channels_last, (b) ``engine.fit``
   in this process, (c) Ray Train with 1 GPU worker, (d) N workers when there are N > 1 GPUs; ratios
   (b)/(a), (c)/(a) and the scaling (d)/(c).
4. ``serve``: benchmarks/serve_load.py with both backends, each replica given one GPU.
Everything measured goes to one JSON (``--json``); a summary is printed at the end.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.loadgen import photo_like  # noqa: E402

SECTIONS = ("env", "tests", "train", "serve")
NUM_CLASSES = 4


def sizes(dry_run: bool) -> dict:
    """The run's sizes: resnet50 @ 224 px on the GPU; a tiny model, images and steps for --dry-run."""
    if dry_run:
        return dict(model="test_resnet", img_size=32, batch_size=4, steps=2, epochs=3, loader_workers=0,
                    amp="off", channels_last="false", serve_model="test_resnet", serve_classes=NUM_CLASSES,
                    serve_args=["--concurrency", "1", "--seconds", "1", "--warmup", "0.5", "--rebuild-repeats", "1",
                                "--num-cpus", "1", "--max-batch-size", "4"])
    cpus = os.cpu_count() or 2
    return dict(model="resnet50", img_size=224, batch_size=64, steps=20, epochs=3,
                loader_workers=max(1, min(8, cpus // 2)), amp="auto", channels_last="true",
                serve_model="resnet50", serve_classes=1000,
                serve_args=["--concurrency", "1", "8", "32", "--seconds", "8", "--warmup", "2", "--rebuild-repeats", "3",
                            "--num-cpus", str(max(1, min(4, cpus // 2))), "--max-batch-size", "32"])


def steady(rates: list[float]) -> float:
    """Median of epochs 2..N (epoch 1 is warm-up: cuDNN autotuning, allocator, first reads)."""
    return statistics.median(rates[1:]) if len(rates) > 1 else rates[0]


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


# ----------------------------------------------------------------------------- steps

def env_info() -> dict:
    """What this machine is: torch, CUDA, the GPUs, ONNX Runtime's providers."""
    import timm
    info = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "cpus": os.cpu_count(), "load": loadavg()}
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        info["onnxruntime"] = None
    return info


def run_gpu_tests(dry_run: bool) -> dict:
    """pytest -m gpu (all of tests/ on a GPU; only tests/test_gpu.py in a dry run, where everything skips)."""
    where = ["tests/test_gpu.py"] if dry_run else ["tests"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rs", *where]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    summary = next((ln for ln in reversed(lines) if " in " in ln and ("passed" in ln or "skipped" in ln
                                                                     or "failed" in ln or "error" in ln)), "")
    return {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "summary": summary.strip("= "),
            "seconds": round(time.perf_counter() - t0, 1), "tail": lines[-15:]}


def make_jpegs(root: str, train: int, val: int, size: int) -> str:
    """A synthetic ImageFolder of photo-like JPEGs (train/ and val/, NUM_CLASSES classes) at about ``size`` px."""
    for split, n in (("train", train), ("val", val)):
        for i in range(n):
            folder = Path(root, split, f"class_{i % NUM_CLASSES}")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:05d}.jpg").write_bytes(photo_like(i + (10**6 if split == "val" else 0), (size, size), "JPEG"))
    return root


def train_config(s: dict, data: str, storage: str, name: str, *, workers: int, use_gpu: bool):
    """The quickstart config with the check's model, sizes, AMP and channels_last; MLflow off."""
    from raytimm.config import load_config

    # Each worker gets its share of the node's CPUs (else N workers would wait for CPUs Ray cannot give);
    # its DataLoader workers fit inside that share, and one core is left for the training process itself.
    share = max(1, (os.cpu_count() or 2) // workers)
    loader_workers = min(s["loader_workers"], share - 1) if use_gpu else s["loader_workers"]
    return load_config(str(REPO / "configs" / "quickstart.yaml"), [
        f"data.path={data}", f"data.num_workers={loader_workers}", "data.verify_images=false",
        "data.rrc=true", f"model.name={s['model']}", "model.pretrained=false", f"model.img_size={s['img_size']}",
        f"train.epochs={s['epochs']}", f"train.batch_size={s['batch_size']}", "train.warmup_epochs=0",
        f"train.amp='{s['amp']}'", f"train.channels_last='{s['channels_last']}'", "train.threads=1",
        f"scaling.num_workers={workers}", f"scaling.use_gpu={'true' if use_gpu else 'false'}",
        f"scaling.cpus_per_worker={loader_workers + 1 if use_gpu else 1}",
        f"storage.path={storage}", f"run.name={name}", "mlflow.enabled=false",
    ])


def plain_loop(cfg, device: torch.device) -> list[float]:
    """(a): a timm train.py-style loop with AMP (GradScaler for fp16) and channels_last; images/s per epoch."""
    import timm
    import timm.optim
    from torch.utils.data import DataLoader

    from raytimm.data.folder import ImageDataset, scan_imagefolder
    from raytimm.data.transforms import build_train_transform, resolve_data_config
    from raytimm.engine import resolve_amp_dtype, resolve_channels_last

    tc, dc = cfg.train, cfg.data
    torch.manual_seed(tc.seed)
    torch.set_num_threads(tc.threads)  # as engine.fit does with train.threads
    scan = scan_imagefolder(dc.path, split_ratio=dc.split_ratio, seed=dc.split_seed, verify=False)
    model = timm.create_model(cfg.model.name, pretrained=False, num_classes=scan.num_classes)
    data_config = resolve_data_config(model, cfg.model.img_size, use_test_size=False)
    transform = build_train_transform(data_config, rrc=dc.rrc, rrc_scale=tuple(dc.rrc_scale),
                                      rrc_ratio=tuple(dc.rrc_ratio), hflip=dc.hflip, color_jitter=dc.color_jitter,
                                      seed=tc.seed)
    loader = DataLoader(ImageDataset(scan.train, transform, max_pixels=dc.max_image_pixels), batch_size=tc.batch_size,
                        shuffle=True, drop_last=True, num_workers=dc.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=dc.num_workers > 0)
    amp_dtype = resolve_amp_dtype(tc.amp, device)
    channels_last = resolve_channels_last(tc.channels_last, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = timm.optim.create_optimizer_v2(model, opt=tc.opt, lr=tc.lr, weight_decay=tc.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    loss_fn = torch.nn.CrossEntropyLoss()
    rates = []
    for _ in range(tc.epochs):
        model.train()
        seen, t0 = 0, time.perf_counter()
        for images, targets in loader:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = loss_fn(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            seen += images.size(0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(seen / (time.perf_counter() - t0))
    return rates


def ray_train_rates(cfg) -> dict:
    """(c)/(d): Ray Train; per-epoch throughput (all workers) from the last checkpoint's history."""
    import ray

    from raytimm import ray_train
    from raytimm.checkpoint import load_meta

    os.environ.pop("RAY_ADDRESS", None)  # a local Ray started here, never someone's cluster
    t0 = time.perf_counter()
    ray_train.init_ray()
    try:
        result = ray_train.train(cfg)
    finally:
        ray.shutdown()
    rates = [float(h["throughput"]) for h in load_meta(result.latest_checkpoint)["history"]]
    return {"rates": rates, "wall_s": round(time.perf_counter() - t0, 1)}


def train_section(s: dict, dry_run: bool, work: str) -> dict:
    """(a), (b), (c), (d) on the same data, model, batch size and steps."""
    from raytimm.engine import fit

    use_gpu = torch.cuda.is_available() and not dry_run
    device = torch.device("cuda" if use_gpu else "cpu")
    gpus = torch.cuda.device_count() if use_gpu else 0
    train_images = s["steps"] * s["batch_size"] * max(1, gpus)  # (d) keeps `steps` per worker per epoch
    data = make_jpegs(os.path.join(work, "data"), train_images, max(NUM_CLASSES, s["batch_size"]), s["img_size"] + 32)
    storage = os.path.join(work, "runs")
    single = dict(workers=1, use_gpu=use_gpu)
    out: dict = {"model": s["model"], "img_size": s["img_size"], "batch_size": s["batch_size"],
                 "steps_per_epoch": s["steps"], "epochs": s["epochs"], "device": str(device), "gpus": gpus,
                 "loader_workers": s["loader_workers"], "runs": {}}
    runs = out["runs"]
    # (a) and (b) read only `steps` batches per epoch: the data folder holds enough for (d)'s N workers.
    ab_data = data if gpus <= 1 else _subset(data, s["steps"] * s["batch_size"], work)
    cfg_ab = train_config(s, ab_data, storage, "a", **single)  # each run's name is set by _named
    for key, label, run in (("a", "(a) plain timm loop, AMP + channels_last", lambda: plain_loop(cfg_ab, device)),
                            ("b", "(b) engine.fit, one process", lambda: fit(_named(cfg_ab, "b"), device=device)),
                            ("c", "(c) Ray Train, 1 worker", lambda: ray_train_rates(_named(cfg_ab, "c")))):
        runs[key] = _timed(label, run)
    if gpus > 1:
        runs["d"] = _timed(f"(d) Ray Train, {gpus} workers",
                           lambda: ray_train_rates(train_config(s, data, storage, "d", workers=gpus, use_gpu=True)))
    else:
        runs["d"] = {"skipped": f"{gpus} GPU(s): scaling needs more than one"}
    base = runs["a"].get("img_s")
    ratios = {}
    for key in ("b", "c"):
        if base and runs[key].get("img_s"):
            ratios[f"{key}/a"] = runs[key]["img_s"] / base
    if runs["d"].get("img_s") and runs["c"].get("img_s"):
        ratios["d/c"] = runs["d"]["img_s"] / runs["c"]["img_s"]
        ratios["scaling_efficiency"] = ratios["d/c"] / gpus
    out["ratios"] = ratios
    return out


def _named(cfg, name: str):
    import dataclasses
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=name))


def _subset(data: str, train_images: int, work: str) -> str:
    """The first ``train_images`` train images (and all of val) as their own ImageFolder, by symlink."""
    root = Path(work, "data_one_worker")
    for split in ("train", "val"):
        files = sorted(Path(data, split).rglob("*.jpg"))
        for f in files[:train_images] if split == "train" else files:
            dest = root / split / f.parent.name / f.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(f)
    return str(root)


def _timed(label: str, run) -> dict:
    """Run one training variant: per-epoch rates, steady img/s and wall seconds, or the error."""
    print(f"{label} ...  load {loadavg()}", flush=True)
    t0 = time.perf_counter()
    try:
        got = run()
    except Exception as exc:  # noqa: BLE001 - recorded, and the next variant still runs
        traceback.print_exc()
        return {"label": label, "error": f"{type(exc).__name__}: {exc}"}
    if hasattr(got, "history"):  # engine.FitResult
        got = {"rates": [float(h["throughput"]) for h in got.history]}
    elif isinstance(got, list):
        got = {"rates": got}
    got.setdefault("wall_s", round(time.perf_counter() - t0, 1))
    got.update(label=label, img_s=steady(got["rates"]))
    print(f"  {label}: {got['img_s']:.1f} img/s (epochs {', '.join(f'{r:.1f}' for r in got['rates'])})", flush=True)
    return got


def serve_section(s: dict, dry_run: bool, work: str) -> dict:
    """benchmarks/serve_load.py with both backends, on the GPU (CPU in a dry run)."""
    out_json = os.path.join(work, "serve.json")
    device = "cuda" if torch.cuda.is_available() and not dry_run else "cpu"
    cmd = [sys.executable, str(REPO / "benchmarks" / "serve_load.py"), "--backends", "torch", "onnx",
           "--device", device, "--model", s["serve_model"], "--num-classes", str(s["serve_classes"]),
           *s["serve_args"], "--json", out_json]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0 or not os.path.exists(out_json):
        tail = (proc.stdout + proc.stderr).splitlines()[-20:]
        return {"error": f"serve_load.py exited {proc.returncode}", "tail": tail}
    return {"command": " ".join(cmd[1:]), **json.loads(Path(out_json).read_text())}


# ----------------------------------------------------------------------------- report

def summary(result: dict) -> str:
    """A few lines: the GPU, tests, training img/s and ratios, serve ratios."""
    env = result.get("env", {})
    lines = [f"gpu check {'(dry run, CPU) ' if result['dry_run'] else ''}on {', '.join(env.get('gpus') or ['no GPU'])}"
             f"; torch {env.get('torch')}, CUDA {env.get('cuda')}, onnxruntime {env.get('onnxruntime')}"]
    tests = result.get("tests", {})
    lines.append(f"tests: {tests.get('summary') or tests.get('error')} (rc {tests.get('returncode')})")
    train = result.get("train", {})
    for key, run in (train.get("runs") or {}).items():
        lines.append(f"train {key}: " + (f"{run['img_s']:.1f} img/s  {run['label']}" if "img_s" in run
                                          else str(run.get("error") or run.get("skipped"))))
    if train.get("ratios"):
        lines.append("train ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in train["ratios"].items()))
    if train.get("error"):
        lines.append(f"train: {train['error']}")
    serve = result.get("serve", {})
    if serve.get("ratios"):
        top = serve["ratios"][-1]
        lines.append("serve @" + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in top.items()))
        for backend, v in serve["backends"].items():
            lines.append(f"serve {backend} server: {v['server']}")
    elif serve.get("error"):
        lines.append(f"serve: {serve['error']}")
    lines.append(f"total {result['seconds']:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in
                                                           result.get("section_seconds", {}).items()) + ")")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the same steps on CPU with tiny sizes")
    p.add_argument("--json", default="gpu_check.json", help="where to write every figure (default gpu_check.json)")
    p.add_argument("--skip", nargs="*", choices=SECTIONS[1:], default=[], help="leave these steps out")
    a = p.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    if not a.dry_run and not torch.cuda.is_available():
        print("no CUDA GPU visible: run with --dry-run to exercise the steps on CPU", file=sys.stderr)
        return 2
    s = sizes(a.dry_run)
    t0 = time.perf_counter()
    result: dict = {"dry_run": a.dry_run, "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                    "sizes": {k: v for k, v in s.items() if k != "serve_args"}}
    steps = {"env": lambda work: env_info(), "tests": lambda work: run_gpu_tests(a.dry_run),
             "train": lambda work: train_section(s, a.dry_run, work),
             "serve": lambda work: serve_section(s, a.dry_run, work)}
    result["section_seconds"] = {}
    with tempfile.TemporaryDirectory(prefix="raytimm-gpucheck-") as work:
        for name in SECTIONS:
            if name in a.skip:
                result[name] = {"skipped": "--skip"}
                continue
            started = time.perf_counter()
            print(f"== {name}  ({started - t0:.0f} s)", flush=True)
            try:
                result[name] = steps[name](work)
            except Exception as exc:  # noqa: BLE001 - one failed step must not lose the others' figures
                traceback.print_exc()
                result[name] = {"error": f"{type(exc).__name__}: {exc}"}
            result["section_seconds"][name] = round(time.perf_counter() - started, 1)
            Path(a.json).write_text(json.dumps(result, indent=2, default=str))  # partial results survive a kill
    result["seconds"] = time.perf_counter() - t0
    result["load_end"] = loadavg()
    Path(a.json).write_text(json.dumps(result, indent=2, default=str))
    print("\n" + summary(result))
    print(f"\nwrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

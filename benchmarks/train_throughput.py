"""Steady-state training images/s: a plain timm loop vs raytimm's engine vs raytimm on Ray Train.

    python benchmarks/train_throughput.py                 # resnet18 @ 64 px, batch 32, 2 threads, 4 epochs
    python benchmarks/train_throughput.py --quick         # a short smoke run
    python benchmarks/train_throughput.py --threads 1 --images 1024

Three runs over the same synthetic demo images, model, train transform, batch size, optimizer,
scheduler, loss, torch thread count and DataLoader workers (``--loader-workers``, default 0,
which is fairest on 2 cores: loading happens in the training process in all three):

(a) a plain single-process PyTorch + timm loop, as timm's train.py runs it: ``timm.create_model``,
    ``create_optimizer_v2``, ``create_scheduler_v2``, a shuffling DataLoader over raytimm's
    ImageDataset and train transform, CE loss, forward / backward / step / ``step_update``, and
    ``loss.item()`` every step as train.py does;
(b) ``raytimm.engine.fit(cfg)`` in this process (no Ray);
(c) ``raytimm.ray_train.train(cfg)``: Ray Train, 1 worker with ``--threads`` CPUs and
    ``train.threads=--threads``.

Method. Every side times each epoch's training pass the same way ``engine.train_one_epoch``
does: the clock starts before the DataLoader iterator is created and stops after the last
optimizer step, so data loading is included and validation, checkpointing and reporting are not;
images/s = images trained / seconds. (b) and (c) take the ``throughput`` metric that the engine
reports for each epoch (from ``FitResult.history``, and for (c) from the ``history`` in the
last checkpoint's meta.json). Epoch 1 is warm-up (allocator, oneDNN primitive creation, first
file reads) and is dropped: the steady-state figure is the median of epochs 2..N, so use
``--epochs`` >= 3. (a) runs a second time after (c), and the baseline is the mean of its two
medians, which brackets drift from other load on a shared machine. (a) also runs once more in this
process while the local Ray is up and idle, just before (c); that row is not part of the baseline
and shows what Ray's own daemons (raylet, GCS, dashboard) cost the same loop on this machine.

Ray's start-up is reported apart and not in images/s: ``ray.init`` seconds, and the wall time
of ``ray_train.train`` outside the timed epochs (worker group start, validation, checkpoint
persistence). MLflow is off in (b) and (c). Load average (/proc/loadavg) is printed before and
after each run: numbers from a machine shared with other jobs are noisy.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

NUM_CLASSES = 4
VAL_FRACTION = 0.1  # validation is not timed; keep it small so runs are short


# ------------------------------------------------------------------ setup

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (and CPUs of the Ray worker)")
    p.add_argument("--images", type=int, default=512, help="synthetic training images (demo shapes)")
    p.add_argument("--epochs", type=int, default=4, help=">= 3; epoch 1 is warm-up and not counted")
    p.add_argument("--loader-workers", type=int, default=0, help="DataLoader workers, the same on every side")
    p.add_argument("--skip-ray", action="store_true", help="only (a) and (b)")
    p.add_argument("--quick", action="store_true", help="small smoke run: 3 epochs of 128 images")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.images = 3, min(args.images, 128)
    if args.epochs < 3:
        p.error("--epochs must be >= 3: epoch 1 is warm-up, and the median needs at least two more")
    if args.images < 2 * args.batch_size:
        p.error("--images must hold at least two batches")
    return args


def loadavg() -> str:
    """The 1/5/15-minute load averages (what else was running)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def cpu_model() -> str:
    """`lscpu`'s model name, else platform.processor()."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def make_data(root: str, images: int, size: int) -> str:
    """Synthetic demo ImageFolder with about ``images`` train images at ``size`` px."""
    from raytimm.data.demo import make_demo_dataset

    per_class = math.ceil(images / NUM_CLASSES / (1 - VAL_FRACTION))
    return make_demo_dataset(root, classes=NUM_CLASSES, per_class=per_class, size=size, val_fraction=VAL_FRACTION)


def bench_config(args, data_root: str, storage: str, run_name: str):
    """The quickstart config with the benchmark's model, sizes, threads and loader workers; MLflow off."""
    from raytimm.config import load_config

    return load_config(str(REPO / "configs" / "quickstart.yaml"), [
        f"data.path={data_root}", f"data.num_workers={args.loader_workers}", "data.verify_images=false",
        f"model.name={args.model}", "model.pretrained=false", f"model.img_size={args.img_size}",
        f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", f"train.threads={args.threads}",
        "train.warmup_epochs=0", "train.amp='off'", "train.channels_last=false",
        "scaling.num_workers=1", f"scaling.cpus_per_worker={args.threads}", "scaling.use_gpu=false",
        f"storage.path={storage}", f"run.name={run_name}", "mlflow.enabled=false",
    ])


def steady(values: list[float]) -> float:
    """Median of epochs 2..N (epoch 1 is warm-up)."""
    return statistics.median(values[1:])


# ------------------------------------------------------------------ (a) plain timm loop

def _create_model(name: str, num_classes: int, img_size: int, drop_rate: float, drop_path_rate: float):
    """timm.create_model; img_size only for models whose constructor takes it (ViTs), as raytimm does."""
    import timm

    kw = dict(pretrained=False, num_classes=num_classes, drop_rate=drop_rate)
    if drop_path_rate:
        kw["drop_path_rate"] = drop_path_rate
    try:
        return timm.create_model(name, img_size=img_size, **kw)
    except TypeError:
        return timm.create_model(name, **kw)


def plain_timm_loop(cfg, threads: int) -> list[float]:
    """(a): per-epoch images/s of a timm train.py-style loop over the same data and transform."""
    import timm.optim
    import timm.scheduler
    from torch.utils.data import DataLoader

    from raytimm.data.folder import ImageDataset, scan_imagefolder
    from raytimm.data.transforms import build_train_transform, resolve_data_config

    torch.set_num_threads(threads)
    tc, dc = cfg.train, cfg.data
    torch.manual_seed(tc.seed)
    scan = scan_imagefolder(dc.path, split_ratio=dc.split_ratio, seed=dc.split_seed, verify=False)
    model = _create_model(cfg.model.name, scan.num_classes, cfg.model.img_size, cfg.model.drop_rate,
                          cfg.model.drop_path_rate)
    data_config = resolve_data_config(model, cfg.model.img_size, use_test_size=False)
    transform = build_train_transform(data_config, rrc=dc.rrc, rrc_scale=tuple(dc.rrc_scale),
                                      rrc_ratio=tuple(dc.rrc_ratio), hflip=dc.hflip, color_jitter=dc.color_jitter,
                                      seed=tc.seed)
    loader = DataLoader(ImageDataset(scan.train, transform, max_pixels=dc.max_image_pixels), batch_size=tc.batch_size,
                        shuffle=True, drop_last=True, num_workers=dc.num_workers,
                        persistent_workers=dc.num_workers > 0)
    optimizer = timm.optim.create_optimizer_v2(model, opt=tc.opt, lr=tc.lr, weight_decay=tc.weight_decay,
                                               momentum=tc.momentum)
    scheduler, _ = timm.scheduler.create_scheduler_v2(optimizer, sched=tc.sched, num_epochs=tc.epochs,
                                                      warmup_epochs=tc.warmup_epochs, min_lr=tc.min_lr,
                                                      step_on_epochs=False, updates_per_epoch=len(loader))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)
    rates, num_updates = [], 0
    for epoch in range(tc.epochs):
        model.train()
        seen, t0 = 0, time.perf_counter()
        for images, targets in loader:
            output = model(images)
            loss = loss_fn(output, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)
            loss.item()  # train.py reads the loss every step for its running average
            seen += images.size(0)
        rates.append(seen / (time.perf_counter() - t0))
        scheduler.step(epoch + 1)
        print(f"  (a) epoch {epoch + 1}: {rates[-1]:.1f} img/s", flush=True)
    return rates


# ------------------------------------------------------------------ (b) engine.fit, (c) Ray Train

def engine_fit(cfg) -> tuple[list[float], float]:
    """(b): per-epoch ``throughput`` from engine.fit in this process, and fit's wall seconds."""
    from raytimm.engine import fit

    t0 = time.perf_counter()
    result = fit(cfg)
    return [float(h["throughput"]) for h in result.history], time.perf_counter() - t0


def _probe_loop(probe_path: str):
    """The real Train worker loop, then a note of the worker's torch threads (to check they match)."""
    def loop(config: dict) -> None:
        from raytimm.ray_train import train_loop_per_worker

        train_loop_per_worker(config)
        info = {"torch_threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                "nice": os.nice(0)}
        Path(probe_path).write_text(json.dumps(info))

    return loop


def start_ray() -> float:
    """Start a local Ray as ``raytimm train`` does; returns the seconds ``ray.init`` took."""
    from raytimm import ray_train

    os.environ.pop("RAY_ADDRESS", None)  # a local Ray started here, never someone's cluster
    t0 = time.perf_counter()
    ray_train.init_ray()
    return time.perf_counter() - t0


def ray_train_run(cfg, probe_path: str) -> dict:
    """(c): train() wall seconds, per-epoch throughput from the last checkpoint's history, the worker's threads."""
    from raytimm import ray_train
    from raytimm.checkpoint import load_meta

    t0 = time.perf_counter()
    result = ray_train.train(cfg, train_loop=_probe_loop(probe_path))
    wall = time.perf_counter() - t0
    history = load_meta(result.latest_checkpoint)["history"]
    worker = json.loads(Path(probe_path).read_text()) if os.path.exists(probe_path) else {}
    return {"rates": [float(h["throughput"]) for h in history], "wall_s": wall, "worker": worker}


# ------------------------------------------------------------------ report

def markdown(rows: list[tuple[str, list[float], float | None]], baseline: float) -> str:
    """A markdown table: run, per-epoch images/s, steady-state images/s, ratio to (a)."""
    lines = ["| run | images/s per epoch (epoch 1 = warm-up) | steady images/s (median 2..N) | vs (a) |",
             "| --- | --- | ---: | ---: |"]
    for name, rates, _ in rows:
        s = steady(rates)
        lines.append(f"| {name} | {', '.join(f'{r:.1f}' for r in rates)} | {s:.1f} | {s / baseline:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import ray
    import timm

    os.environ.setdefault("TQDM_DISABLE", "1")
    started = _dt.datetime.now().astimezone()
    print(f"# train throughput: {args.model} @ {args.img_size} px, batch {args.batch_size}, {args.threads} thread(s), "
          f"{args.epochs} epochs, loader workers {args.loader_workers}")
    print(f"machine: {os.cpu_count()} CPUs, {cpu_model()}; torch {torch.__version__}, timm {timm.__version__}, "
          f"ray {ray.__version__}, python {platform.python_version()}; {started:%Y-%m-%d %H:%M %Z}")
    loads = {}
    with tempfile.TemporaryDirectory(prefix="raytimm-bench-") as tmp:
        data_root = make_data(os.path.join(tmp, "data"), args.images, args.img_size)
        from raytimm.data.folder import scan_imagefolder

        n_train = len(scan_imagefolder(data_root, verify=False).train)
        per_epoch = args.batch_size * (n_train // args.batch_size)  # drop_last, on every side
        print(f"data: {n_train} train images ({per_epoch} trained per epoch), {NUM_CLASSES} classes", flush=True)
        cfg_b = bench_config(args, data_root, os.path.join(tmp, "runs"), "bench-engine")
        cfg_c = bench_config(args, data_root, os.path.join(tmp, "runs"), "bench-ray")

        loads["a1"] = loadavg()
        print(f"(a) plain timm loop   load {loads['a1']}", flush=True)
        a1 = plain_timm_loop(cfg_b, args.threads)
        loads["b"] = loadavg()
        print(f"(b) raytimm engine.fit   load {loads['b']}", flush=True)
        b, b_wall = engine_fit(cfg_b)
        c = a_ray = None
        if not args.skip_ray:
            init_s = start_ray()
            try:
                # Same loop in this process while an idle local Ray runs: what Ray's own daemons cost.
                loads["a_ray"] = loadavg()
                print(f"(a) plain timm loop, local Ray idle   load {loads['a_ray']}", flush=True)
                a_ray = plain_timm_loop(cfg_b, args.threads)
                loads["c"] = loadavg()
                print(f"(c) raytimm on Ray Train, 1 worker   load {loads['c']}", flush=True)
                c = ray_train_run(cfg_c, os.path.join(tmp, "worker_probe.json"))
                c["init_s"] = init_s
            finally:
                ray.shutdown()
        loads["a2"] = loadavg()
        print(f"(a) plain timm loop, again   load {loads['a2']}", flush=True)
        a2 = plain_timm_loop(cfg_b, args.threads)
        loads["end"] = loadavg()

    baseline = (steady(a1) + steady(a2)) / 2
    rows = [("(a) plain timm loop, first", a1, None), ("(a) plain timm loop, after (c)" if c is not None else "(a) plain timm loop, again", a2, None),
            ("(b) raytimm engine.fit, 1 process", b, b_wall)]
    if c is not None:
        rows.append(("(a) plain timm loop, local Ray idle (not in the baseline)", a_ray, None))
        rows.append(("(c) raytimm on Ray Train, 1 worker", c["rates"], c["wall_s"]))
    print()
    print(markdown(rows, baseline))
    print()
    print(f"baseline (a) = mean of the two (a) medians = {baseline:.1f} img/s")
    print(f"(b)/(a) = {steady(b) / baseline:.3f}")
    if c is not None:
        timed = sum(per_epoch / r for r in c["rates"])
        print(f"(c)/(a) = {steady(c['rates']) / baseline:.3f}   (target >= 0.95); "
              f"(c)/(a with Ray idle) = {steady(c['rates']) / steady(a_ray):.3f}")
        print(f"Ray start-up: ray.init {c['init_s']:.1f} s; ray_train.train wall {c['wall_s']:.1f} s, of which "
              f"about {timed:.1f} s timed training epochs (the rest: worker start, validation, checkpoints)")
        print(f"Ray worker: {json.dumps(c['worker'])}")
    print(f"engine.fit wall {b_wall:.1f} s")
    print("load average (1/5/15 min) before each run: " + "; ".join(f"{k} {v}" for k, v in loads.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

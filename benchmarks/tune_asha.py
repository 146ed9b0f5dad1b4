"""ASHA against FIFO on the same 8-trial sweep: trial-epochs spent and best val/top1 found.

    python benchmarks/tune_asha.py [--epochs 8] [--per-class 40] [--size 32] [--model test_resnet]

Both sweeps run the same grid of 8 learning rates over configs/tune/demo_asha.yaml on freshly
made demo data, one after the other on one Ray head. Target (issue 5): ASHA spends <= 50% of
FIFO's trial-epochs with a best val/top1 within 1 point.

Two epoch counts are reported: "scheduled" is what Tune saw and decided on (the trial table's
`epochs`); "trained" also counts epochs a stopped trial's workers finished while the stop was
on its way (the newest checkpoint in each trial folder), i.e. the compute actually spent.

Ray starts as `ray start --head` on loopback with RAY_ADDRESS in its environment (tests/helpers_ray.py):
Train's placement-group cleaner finds its cluster through that even when other Ray instances run on
the machine (a plain local `ray.init()` cannot tell them apart, and then leaks stopped trials' CPUs).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers_ray import ray_head, wait_cpus_free  # noqa: E402  (the same head tests/test_tune.py uses)

LRS = [3e-2, 1e-2, 5e-3, 3e-3, 1e-3, 3e-4, 1e-4, 1e-7]


def run_sweep(scheduler: str, *, data: str, runs: str, epochs: int, model: str, size: int, quiet: bool) -> dict:
    """One sweep; returns trial-epochs (scheduled and trained), best val/top1, wall time."""
    from raytimm.config import load_config
    from raytimm.ray_tune import tune
    from raytimm.tune_results import trial_checkpoints

    space = "{train.lr: {grid: [" + ", ".join(f"{lr:g}" for lr in LRS) + "]}}"
    cfg = load_config(str(ROOT / "configs/tune/demo_asha.yaml"),
                      [f"data.path={data}", f"storage.path={runs}", f"train.epochs={epochs}", f"model.name={model}",
                       f"model.img_size={size}", f"tune.scheduler={scheduler}", f"tune.name=bench-{scheduler}",
                       f"tune.search_space={space}", "mlflow.enabled=false"])
    start = time.perf_counter()
    with contextlib.redirect_stdout(open(os.devnull, "w")) if quiet else contextlib.nullcontext():
        result = tune(cfg)
    wall = time.perf_counter() - start
    trained = sum(int(max([c[1].get("epoch", 0) for c in trial_checkpoints(t.run_dir)] + [0]))
                  for t in result.trials)
    return {
        "scheduler": scheduler,
        "trials": len(result.trials),
        "scheduled_epochs": sum(t.epochs for t in result.trials),
        "trained_epochs": trained,
        "best_top1": max(t.best_metrics.get("val/top1", 0.0) for t in result.trials),
        "stopped": sum(t.status == "stopped" for t in result.trials),
        "wall_s": wall,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8, help="max_t: epochs of a trial that is never stopped")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--per-class", type=int, default=40, help="demo images per class (a quarter go to val)")
    p.add_argument("--size", type=int, default=32, help="image side and model input size in pixels")
    p.add_argument("--model", default="test_resnet")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the Ray head (1 per trial)")
    p.add_argument("--verbose", action="store_true", help="show the trial tables")
    a = p.parse_args()

    from raytimm.data.demo import make_demo_dataset
    from raytimm.logs import quiet_env

    quiet_env()
    with tempfile.TemporaryDirectory(prefix="raytimm-bench-tune-") as tmp:
        data = make_demo_dataset(os.path.join(tmp, "data"), classes=a.classes, per_class=a.per_class, size=a.size,
                                 seed=0)
        os.makedirs(os.path.join(tmp, "ray"))
        with ray_head(a.cpus, os.path.join(tmp, "ray")):
            import ray

            rows = []
            for scheduler in ("fifo", "asha"):
                wait_cpus_free(ray.cluster_resources().get("CPU", 0))
                rows.append(run_sweep(scheduler, data=data, runs=os.path.join(tmp, "runs"), epochs=a.epochs,
                                      model=a.model, size=a.size, quiet=not a.verbose))
    fifo, asha = rows
    print(f"\ntune_asha: {len(LRS)} trials (lr grid {', '.join(f'{lr:g}' for lr in LRS)}), {a.epochs} epochs max, "
          f"{a.model} at {a.size}px, demo {a.classes}x{a.per_class}, {a.cpus} CPUs")
    print(f"{'scheduler':<10} {'trial-epochs':>12} {'trained':>8} {'stopped':>8} {'best val/top1':>14} {'wall s':>8}")
    for r in rows:
        print(f"{r['scheduler']:<10} {r['scheduled_epochs']:>12} {r['trained_epochs']:>8} {r['stopped']:>8} "
              f"{r['best_top1']:>14.2f} {r['wall_s']:>8.1f}")
    ratio = asha["scheduled_epochs"] / fifo["scheduled_epochs"]
    trained_ratio = asha["trained_epochs"] / fifo["trained_epochs"]
    gap = fifo["best_top1"] - asha["best_top1"]
    ok = ratio <= 0.5 and gap <= 1.0
    print(f"ASHA/FIFO trial-epochs {ratio:.2f} (trained {trained_ratio:.2f}); best val/top1 gap {gap:+.2f} points; "
          f"target <= 0.50 and <= 1 point: {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

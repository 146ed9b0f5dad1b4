"""Class imbalance: data.balance none / sampler / loss on a 10:1 subset of the demo data.

    python benchmarks/imbalance.py                  # 4 classes, train 200:20:20:20, val 100:10:10:10, 3 seeds
    python benchmarks/imbalance.py --quick          # one seed, 2 epochs: a smoke run

Method. The synthetic demo ImageFolder (coloured shapes) is cut down so that the first class has ten times the
images of each other class, in train and in val alike (val keeps the training distribution, so val/top1 rewards
the majority class and val/balanced_acc, the mean per-class recall, shows the minorities). The same config trains
with each ``data.balance`` mode for every seed, in this process with ``raytimm.engine.fit`` (no Ray: this measures
accuracy, not speed). The table gives, per mode, the mean and range over seeds of the LAST epoch's val/top1 and
val/balanced_acc, and the last epoch's mean recall of the minority classes. Baseline: ``none`` in the same run.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODES = ("none", "sampler", "loss")


def make_imbalanced(root: Path, *, classes: int, major: int, ratio: int, size: int) -> Path:
    """Demo ImageFolder with train major:major/ratio:... and val (major/2):(major/2/ratio):..."""
    from raytimm.data.demo import make_demo_dataset

    val_major = major // 2
    per_class = major + val_major
    data = Path(make_demo_dataset(root, classes=classes, per_class=per_class, size=size,
                                  val_fraction=val_major / per_class, seed=11))
    for split, n_major in (("train", major), ("val", val_major)):
        for i, cls in enumerate(sorted(p.name for p in (data / split).iterdir())):
            keep = n_major if i == 0 else n_major // ratio
            for extra in sorted((data / split / cls).iterdir())[keep:]:
                extra.unlink()
    return data


def run(data: Path, runs: Path, *, mode: str, seed: int, epochs: int, model: str, size: int, threads: int) -> dict:
    """One engine.fit; the last epoch's metrics and per-class recall."""
    from raytimm.config import config_from_dict
    from raytimm.engine import fit

    cfg = config_from_dict({
        "data": {"path": str(data), "num_workers": 0, "rrc": False, "hflip": 0.5, "color_jitter": 0.0,
                 "balance": mode},
        "model": {"name": model, "img_size": size},
        "train": {"epochs": epochs, "batch_size": 32, "lr": 0.002, "weight_decay": 0.01, "warmup_epochs": 0,
                  "label_smoothing": 0.0, "seed": seed, "threads": threads},
        "storage": {"path": str(runs)}, "run": {"name": f"{mode}-{seed}"}, "mlflow": {"enabled": False},
        "checkpoint": {"num_to_keep": 1},
    })
    result = fit(cfg)
    last = result.history[-1]
    # per_class of the best epoch is in the result; the last epoch's comes from its checkpoint.
    from raytimm import checkpoint as ckpt

    meta = ckpt.load_meta(result.latest_checkpoint)
    minority = [r["top1"] for r in meta["per_class"][1:]]
    return {"top1": last["val/top1"], "balanced_acc": last["val/balanced_acc"],
            "minority_recall": statistics.mean(minority)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--major", type=int, default=200, help="train images of the majority class")
    p.add_argument("--ratio", type=int, default=10, help="majority : minority")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="one seed, 2 epochs")
    a = p.parse_args()
    if a.quick:
        a.seeds, a.epochs = 1, 2
    os.environ.setdefault("TQDM_DISABLE", "1")
    import logging

    logging.basicConfig(level=logging.WARNING)
    started = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# imbalance benchmark  {started}  python {platform.python_version()}  {platform.machine()}  "
          f"cpus {os.cpu_count()}  load {open('/proc/loadavg').read().split()[:3]}")
    with tempfile.TemporaryDirectory(prefix="raytimm-imbalance-") as tmp:
        data = make_imbalanced(Path(tmp) / "data", classes=a.classes, major=a.major, ratio=a.ratio, size=a.size)
        counts = {s: [len(list((data / s / c).iterdir())) for c in sorted(os.listdir(data / s))] for s in ("train", "val")}
        print(f"train per class {counts['train']}  val per class {counts['val']}  model {a.model} @ {a.size}px  "
              f"{a.epochs} epochs  seeds 0..{a.seeds - 1}")
        results = {m: [] for m in MODES}
        for seed in range(a.seeds):
            for mode in MODES:
                r = run(data, Path(tmp) / "runs", mode=mode, seed=seed, epochs=a.epochs, model=a.model, size=a.size,
                        threads=a.threads)
                results[mode].append(r)
                print(f"seed {seed}  {mode:<8} top1 {r['top1']:6.2f}  balanced_acc {r['balanced_acc']:6.2f}  "
                      f"minority recall {r['minority_recall']:6.2f}", flush=True)
    print()
    print("| data.balance | val/top1 mean (min–max) | val/balanced_acc mean (min–max) | minority-class recall mean | "
          "balanced_acc vs none |")
    print("| --- | ---: | ---: | ---: | ---: |")
    base = statistics.mean(r["balanced_acc"] for r in results["none"])
    for mode in MODES:
        rs = results[mode]

        def cell(key):
            values = [r[key] for r in rs]
            return f"{statistics.mean(values):.1f} ({min(values):.1f}–{max(values):.1f})"

        bal = statistics.mean(r["balanced_acc"] for r in rs)
        print(f"| {mode} | {cell('top1')} | {cell('balanced_acc')} | "
              f"{statistics.mean(r['minority_recall'] for r in rs):.1f} | {bal - base:+.1f} points |")
    print(f"\nload after: {open('/proc/loadavg').read().split()[:3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

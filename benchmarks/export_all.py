"""Export every target model (configs/train/*.yaml) to ONNX, and time eager PyTorch against ONNX Runtime.

    python benchmarks/export_all.py                      # all 11 models, then resnet18 latency
    python benchmarks/export_all.py --models resnet18    # a subset
    python benchmarks/export_all.py --skip-latency

Part 1, per model: a randomly initialised checkpoint (pretrained=False, --num-classes classes; the
weights do not change export time, size or exactness much) at the config's model.img_size, saved with
checkpoint.save_checkpoint and exported with ``raytimm.export.export_checkpoint`` exactly as
``raytimm export`` does. Prints the checkpoint's and the export's size, the export time
(torch.onnx.export and saving; not the parity check) and the parity check's max |Δ logit| against
its tolerance on the random probe batch.

Part 2 (the baseline in the same run): resnet18 at 224 px with a 1000-class head, forward latency of the two Predictor
backends (TorchRunner: eager PyTorch in inference mode; OnnxRunner: ONNX Runtime's CPU provider) with
the same --threads, at batch 1 and 16. The two are timed alternately, --rounds rounds of --reps calls
each after a warm-up, so load changes hit both; the figure is the median call time, and the ratio is
torch / onnx (above 1: ONNX Runtime is faster).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_checkpoint(name: str, img_size: int, num_classes: int, path: str) -> str:
    """A pretrained=False checkpoint with the data config training would store for img_size."""
    from raytimm.checkpoint import save_checkpoint
    from raytimm.data.transforms import resolve_data_config
    from raytimm.model import build_model

    torch.manual_seed(0)
    model = build_model(name, num_classes=num_classes, img_size=img_size)
    save_checkpoint(path, model_state=model.state_dict(), meta={
        "model_name": name, "num_classes": num_classes, "class_names": [f"class_{i}" for i in range(num_classes)],
        "data_config": resolve_data_config(model, img_size=img_size), "img_size": img_size, "epoch": 0,
        "metrics": {}})
    return path


def export_all(models: list[tuple[str, int]], num_classes: int, workdir: str) -> list[dict]:
    """Export each (name, img_size); one row of figures per model."""
    from raytimm.export import export_checkpoint
    from raytimm.errors import RaytimmError

    rows = []
    for name, img_size in models:
        source = make_checkpoint(name, img_size, num_classes, os.path.join(workdir, name))
        try:
            result = export_checkpoint(source)
        except RaytimmError as e:
            print(f"{name}: FAILED: {e}", flush=True)
            rows.append({"model": name, "img_size": img_size, "error": str(e)})
            continue
        (p,) = result.parity
        row = {"model": name, "img_size": img_size,
               "safetensors_mib": os.path.getsize(os.path.join(source, "model.safetensors")) / 2**20,
               "onnx_mib": result.onnx_bytes / 2**20, "export_s": result.export_s, "max_abs_diff": p.max_abs_diff,
               "tolerance": p.tolerance, "top1": f"{p.top1_agree}/{p.count}"}
        rows.append(row)
        print(f"{name}: {row['onnx_mib']:.1f} MiB, {row['export_s']:.1f} s, max |Δ logit| {p.max_abs_diff:.2g} "
              f"(tolerance {p.tolerance:.2g})", flush=True)
    return rows


def latency(name: str, threads: int, batches: list[int], rounds: int, reps: int, workdir: str) -> list[dict]:
    """Median forward time of the torch and onnx runners, timed alternately in the same run."""
    from raytimm.export import OnnxRunner, export_predictor
    from raytimm.predict import Predictor

    torch.set_num_threads(threads)
    source = make_checkpoint(name, 224, 1000, os.path.join(workdir, f"latency-{name}"))
    torch_pred = Predictor.from_checkpoint(source, device="cpu")
    folder = tempfile.mkdtemp(dir=workdir)
    export_predictor(torch_pred, folder)
    runners = {"torch": torch_pred.runner,
               "onnx": OnnxRunner(os.path.join(folder, "model.onnx"), name=name, num_threads=threads,
                                  providers=["CPUExecutionProvider"])}
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, 224, 224)
        times: dict[str, list[float]] = {k: [] for k in runners}
        for backend, runner in runners.items():  # warm-up
            for _ in range(3):
                runner.logits(x)
        for _ in range(rounds):
            for backend, runner in runners.items():
                for _ in range(reps):
                    start = time.perf_counter()
                    runner.logits(x)
                    times[backend].append(time.perf_counter() - start)
        med = {k: statistics.median(v) * 1000 for k, v in times.items()}
        rows.append({"batch": batch, "torch_ms": med["torch"], "onnx_ms": med["onnx"],
                     "ratio": med["torch"] / med["onnx"], "calls": len(times["torch"])})
        print(f"{name} batch {batch}: torch {med['torch']:.1f} ms, onnx {med['onnx']:.1f} ms, "
              f"torch/onnx {med['torch'] / med['onnx']:.2f}", flush=True)
    return rows


def target_models() -> list[tuple[str, int]]:
    from raytimm.config import load_config

    return [(cfg.model.name, int(cfg.model.img_size)) for cfg in
            (load_config(str(p)) for p in sorted((REPO / "configs" / "train").glob("*.yaml")))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", help="subset of the target model names (default: all)")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads (default 2)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--skip-export", action="store_true")
    a = ap.parse_args(argv)

    import onnxruntime
    import timm

    from raytimm.logs import quiet_third_party
    quiet_third_party()
    torch.set_num_threads(a.threads)
    print(f"load average {os.getloadavg()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
          f"torch {torch.__version__}, timm {timm.__version__}, onnxruntime {onnxruntime.__version__}", flush=True)
    models = target_models()
    if a.models:
        models = [m for m in models if m[0] in a.models]
    with tempfile.TemporaryDirectory(prefix="raytimm-export-bench-") as workdir:
        if not a.skip_export:
            rows = export_all(models, a.num_classes, workdir)
            print("\n| model | img | safetensors MiB | onnx MiB | export s | max abs Δ logit | tolerance | top-1 |")
            print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
            for r in rows:
                if "error" in r:
                    print(f"| {r['model']} | {r['img_size']} | failed: {r['error']} |")
                    continue
                print(f"| {r['model']} | {r['img_size']} | {r['safetensors_mib']:.1f} | {r['onnx_mib']:.1f} | "
                      f"{r['export_s']:.1f} | {r['max_abs_diff']:.1e} | {r['tolerance']:.1e} | {r['top1']} |")
        if not a.skip_latency:
            rows = latency("resnet18", a.threads, [1, 16], a.rounds, a.reps, workdir)
            print(f"\n| resnet18 @ 224, {a.threads} threads | torch ms | onnx ms | torch/onnx |")
            print("| --- | ---: | ---: | ---: |")
            for r in rows:
                print(f"| batch {r['batch']} | {r['torch_ms']:.1f} | {r['onnx_ms']:.1f} | {r['ratio']:.2f} |")
    print(f"load average after {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

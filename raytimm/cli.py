"""raytimm command line: each subcommand loads its inputs and calls one function. No logic here.

Heavy imports (torch, ray, mlflow) happen inside the subcommands so ``--help`` and config
errors answer instantly.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
from pathlib import Path
from typing import Optional, Sequence

from raytimm import __version__
from raytimm.data.extensions import IMAGE_EXTENSIONS
from raytimm.errors import RaytimmError

EPILOG_OVERRIDES = """\
overrides:
  Any config key can be set on the command line as dotted key=value pairs, e.g.
    train.epochs=3 scaling.num_workers=2 model.name=resnet50 data.path=r2://bucket/ds
  Values are parsed as YAML (3 -> int, [0.5,1.0] -> list, null -> None).
  `raytimm config-keys` lists every key with its default and meaning.
"""


def _write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, p)


# ------------------------------------------------------------------ subcommands

def cmd_demo_data(a: argparse.Namespace) -> int:
    from raytimm.data.demo import make_demo_dataset, make_demo_dice, make_demo_multilabel

    if a.multi_label:
        fmt = a.format or "manifest"
        if fmt == "imagefolder":
            raise RaytimmError("--multi-label writes --format manifest (default) or dice: class folders cannot "
                               "hold a set of labels per image")
        images = a.classes * a.per_class
        path = make_demo_multilabel(a.output, classes=a.classes, images=images, size=a.size or 64, seed=a.seed,
                                    format=fmt)
        print(f"wrote multi-label demo dataset ({fmt}, {a.classes} labels, {images} images with 1-3 shapes, "
              f"{a.size or 64}px): {path}")
        return 0
    a.format, a.size = a.format or "imagefolder", a.size or 48
    if a.format == "manifest":
        raise RaytimmError("--format manifest is for the multi-label demo: add --multi-label")
    if a.format == "dice":
        root = make_demo_dice(a.output, classes=a.classes, per_class=a.per_class, size=a.size, seed=a.seed)
    else:
        root = make_demo_dataset(a.output, classes=a.classes, per_class=a.per_class, size=a.size, seed=a.seed)
    print(f"wrote demo dataset ({a.format}, {a.classes} classes x {a.per_class} images, {a.size}px) to {root}")
    return 0


def cmd_convert_dice(a: argparse.Namespace) -> int:
    from raytimm.data.dice import convert_dice

    # convert_dice prints one warning per skipped entry and the summary itself.
    convert_dice(a.input, a.output, split_ratio=a.split_ratio, strategy=a.strategy,
                 split_file=a.split_file, seed=a.seed, link=a.link, multi_label=a.multi_label)
    return 0


def cmd_dataset_report(a: argparse.Namespace) -> int:
    from raytimm.data.folder import format_report, scan_imagefolder
    from raytimm.data.manifest import is_manifest, scan_manifest

    if is_manifest(a.data):
        scan = scan_manifest(a.data, multi_label=a.multi_label, split_ratio=a.split_ratio, seed=a.seed)
    elif a.multi_label:
        raise RaytimmError(f"--multi-label needs a manifest .csv as --data (got {a.data}); "
                           "`raytimm convert dice --multi-label` writes one from a DICE export")
    else:
        scan = scan_imagefolder(a.data, split_ratio=a.split_ratio, seed=a.seed)
    print(format_report(scan))
    return 0


def _load_cfg(a: argparse.Namespace):
    from raytimm.config import load_config
    from raytimm.platform_request import load_training_request

    if a.request:
        return load_training_request(a.request, a.overrides, base_config=a.config)
    if not a.config:
        raise RaytimmError("give --config FILE (see configs/) or --request REQUEST.json")
    return load_config(a.config, a.overrides)


def cmd_train(a: argparse.Namespace) -> int:
    cfg = _load_cfg(a)
    from raytimm.ray_train import train

    result = train(cfg)
    _write_json(a.result_json, result.to_dict())
    print(f"best checkpoint: {result.best_checkpoint}")
    return 0


def cmd_tune(a: argparse.Namespace) -> int:
    from raytimm.config import load_config

    cfg = load_config(a.config, a.overrides)
    from raytimm.ray_tune import tune

    result = tune(cfg)
    _write_json(a.result_json, result.to_dict())
    print(f"best checkpoint: {result.best_checkpoint}")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from raytimm.predict import evaluate_checkpoint

    out = evaluate_checkpoint(a.checkpoint, a.data, split=a.split, batch_size=a.batch_size,
                              predictions_csv=a.predictions, model_name=a.model_name,
                              num_classes=a.num_classes, backend=a.backend)
    if out.get("task_type") == "multi_label_classification":
        return _report_multilabel_evaluation(out, a.result_json)
    if a.predictions:
        from raytimm.plots import confusion_matrix_png

        png = str(Path(a.predictions).with_suffix("")) + "_confusion.png"
        confusion_matrix_png(out["confusion_matrix"], out["class_names"], png)
        print(f"predictions: {a.predictions}\nconfusion matrix: {png}")
    print(f"top1 {out['top1']:.2f}  top5 {out['top5']:.2f}  loss {out['loss']:.4f}  images {out['num_samples']}")
    for name, acc in out["per_class"].items():
        print(f"  {name:<24} {acc:6.2f}")
    _write_json(a.result_json, {k: out[k] for k in ("top1", "top5", "loss", "num_samples", "per_class")})
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    from raytimm.batch_predict import format_summary, parse_concurrency, predict_to_output

    summary = predict_to_output(a.checkpoint, a.input, a.output, fmt=a.format, top_k=a.top_k,
                                batch_size=a.batch_size, concurrency=parse_concurrency(a.concurrency),
                                num_gpus=a.num_gpus, cpus_per_actor=a.cpus_per_actor, decode_cpus=a.decode_cpus,
                                shard_size=a.shard_size,
                                backend=a.backend, model_name=a.model_name, num_classes=a.num_classes,
                                max_file_mb=a.max_file_mb)
    print(format_summary(summary))
    _write_json(a.result_json, summary)
    return 0


def _report_multilabel_evaluation(out: dict, result_json: Optional[str]) -> int:
    """Print and save what evaluate_multilabel_checkpoint measured."""
    if out["predictions_csv"]:
        print(f"predictions: {out['predictions_csv']}")
    print(f"mAP {out['mAP']:.2f}  f1_micro {out['f1_micro']:.2f}  f1_macro {out['f1_macro']:.2f}  "
          f"loss {out['loss']:.4f}  images {out['num_samples']}")
    print(f"  {'label':<24} {'support':>7} {'AP':>6} {'prec':>6} {'recall':>6} {'F1':>6} {'thresh':>6}")
    for name, r in out["per_class"].items():
        print(f"  {name:<24} {r['support']:7d} {r['ap']:6.2f} {r['precision']:6.2f} {r['recall']:6.2f} "
              f"{r['f1']:6.2f} {r['threshold']:6.3f}")
    _write_json(result_json, {k: out[k] for k in ("task_type", "mAP", "f1_micro", "f1_macro", "loss",
                                                  "num_samples", "thresholds", "per_class")})
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from raytimm.export import export_checkpoint

    result = export_checkpoint(a.checkpoint, output=a.output, opset=a.opset, img_size=a.img_size,
                               check_images=a.check_images, model_name=a.model_name, num_classes=a.num_classes)
    print(result.describe())
    _write_json(a.result_json, result.to_dict())
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from raytimm.serve.settings import given_flags, settings_from_cli

    settings = settings_from_cli(a.config, given_flags(a))
    if a.config:  # the file's storage section names the endpoint checkpoints are read from, here and in replicas
        from raytimm import storage
        from raytimm.config import load_config

        section = load_config(a.config).storage
        storage.configure(endpoint_url=section.endpoint_url, region=section.region)
    from raytimm.serve.server import run_server

    run_server(settings)
    return 0


def _cache_folder(a: argparse.Namespace) -> str:
    from raytimm import cache

    root = cache.cache_root(a.cache_dir)
    if os.path.exists(root) and not os.path.isdir(root):
        raise RaytimmError(f"cache folder {root} is not a folder; give --cache-dir a folder")
    if a.cache_dir and not os.path.isdir(root):
        raise RaytimmError(f"--cache-dir {a.cache_dir}: no such folder")
    return root


def cmd_cache_ls(a: argparse.Namespace) -> int:
    from raytimm import cache

    root = _cache_folder(a)
    entries = cache.list_entries(root)
    total = cache.total_bytes(root)
    if a.json:
        print(json.dumps({"cache_dir": root, "total_bytes": total, "entries": [e.to_dict() for e in entries]},
                         indent=2, ensure_ascii=False))
        return 0
    if not entries:
        print(f"no cache entries in {root}")
        return 0
    print(f"{'KIND':<8} {'SIZE':>9}  {'LAST USED':<19}  {'IN USE':<6}  SOURCE")
    for e in entries:
        print(f"{e.kind:<8} {cache.format_size(e.size):>9}  {e.to_dict()['last_used'].replace('T', ' '):<19}  "
              f"{'yes' if e.in_use else 'no':<6}  {e.source}")
    print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {cache.format_size(total)} in {root}")
    return 0


def cmd_cache_prune(a: argparse.Namespace) -> int:
    from raytimm import cache

    if a.max_gb is not None and not a.max_gb > 0:
        raise RaytimmError(f"--max-gb {a.max_gb:g}: expected a size in GB > 0 (--all removes every entry not in use)")
    root = _cache_folder(a)
    limit = 0 if a.all else int((a.max_gb if a.max_gb is not None else _default_cache_max_gb()) * cache.GB)
    report = cache.prune(root, max_bytes=limit)
    for e in report.removed:
        print(f"removed  {e.kind:<8} {cache.format_size(e.size):>9}  {e.source}")
    for e in report.kept_in_use:
        print(f"in use   {e.kind:<8} {cache.format_size(e.size):>9}  {e.source}  (kept)")
    print(f"{len(report.removed)} removed; {cache.format_size(report.total_bytes)} left in {root}"
          + ("" if a.all else f" (limit {cache.format_size(limit)})"))
    return 0


def _default_cache_max_gb() -> float:
    from raytimm.config import Config

    return Config().data.cache_max_gb


def cmd_status(a: argparse.Namespace) -> int:
    from raytimm.runs import format_progress, progress_uri, read_progress

    progress = read_progress(a.run_dir)
    if progress is None:
        raise RaytimmError(f"{progress_uri(a.run_dir)} does not exist: not a run folder, or its run has not "
                           f"started yet (give <storage.path>/<run.name>)")
    print(json.dumps(progress, indent=2, ensure_ascii=False) if a.json else format_progress(progress))
    return 0


def cmd_config_keys(a: argparse.Namespace) -> int:
    from raytimm.config import Config, field_docs, flatten_config

    defaults = flatten_config(Config())
    for key, doc in field_docs().items():
        print(f"{key:<32} {json.dumps(defaults[key], ensure_ascii=False):<14} {doc}")
    return 0


# ------------------------------------------------------------------ parser


def _add_legacy_pt_args(s: argparse.ArgumentParser) -> None:
    """--model-name/--num-classes: what a legacy .pt checkpoint (weights only) does not say about itself."""
    s.add_argument("--model-name", help="timm model name (legacy .pt checkpoints only)")
    s.add_argument("--num-classes", type=int, help="number of classes (legacy .pt checkpoints only)")


def build_parser() -> argparse.ArgumentParser:
    from raytimm import predict_output as out  # predict's formats and shard size (stdlib + storage only)

    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="raytimm", formatter_class=fmt,
        description="Train, tune and serve timm image classifiers on Ray.",
        epilog=textwrap.dedent("""\
            quickstart:
              raytimm demo-data --output data/demo
              raytimm train --config configs/quickstart.yaml --result-json runs/result.json
              raytimm serve --checkpoint runs/quickstart
            on a cluster:
              ray job submit --working-dir . -- raytimm train --config configs/train/resnet50.yaml data.path=r2://bucket/ds
            """))
    p.add_argument("--version", action="version", version=f"raytimm {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="show debug logs, including Ray's")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("demo-data", help="write a small synthetic dataset (coloured shapes)", formatter_class=fmt,
                       description="Write a deterministic synthetic dataset that a tiny model learns in seconds.")
    s.add_argument("--output", required=True, help="folder to create")
    s.add_argument("--classes", type=int, default=4, help="number of classes (default 4, max 10)")
    s.add_argument("--per-class", type=int, default=64, help="images per class (default 64)")
    s.add_argument("--size", type=int, help="image side in pixels (default 48; multi-label 64)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--format", choices=["imagefolder", "dice", "manifest"],
                   help="ImageFolder tree (default), a DICE export, or (multi-label) images + labels.csv (default)")
    s.add_argument("--multi-label", action="store_true",
                   help="1-3 shapes per image, labels = the shapes drawn; classes x per-class images")
    s.set_defaults(func=cmd_demo_data)

    s = sub.add_parser("convert", help="convert a dataset export into an ImageFolder tree")
    csub = s.add_subparsers(dest="kind", metavar="KIND", required=True)
    c = csub.add_parser("dice", help="DICE (labelme-style) export -> ImageFolder", formatter_class=fmt,
                        description=textwrap.dedent("""\
                            Convert a DICE export (images/ + annotations/*.json with imagePath and
                            shapes[].label) into train/ and val/ class folders, classes.txt and split.json.
                            Bad entries are skipped with one warning each; hostile labels and paths are refused."""))
    c.add_argument("--input", required=True, help="DICE export folder (has images/ and annotations/)")
    c.add_argument("--output", required=True, help="ImageFolder to write (replaced only if it is an earlier conversion)")
    c.add_argument("--split-ratio", type=float, default=0.8, help="train fraction, in (0, 1) (default 0.8)")
    c.add_argument("--strategy", choices=["stratified", "random", "sequential", "file"], default="stratified",
                   help="how to split train/val (default stratified)")
    c.add_argument("--split-file", help="with --strategy file: text file listing the training images")
    c.add_argument("--seed", type=int, default=42, help="split seed (default 42)")
    c.add_argument("--link", action="store_true", help="hard-link images instead of copying (large datasets)")
    c.add_argument("--multi-label", action="store_true",
                   help="every shape's label counts: write images/ + manifest.csv (file,labels,split)")
    c.set_defaults(func=cmd_convert_dice)

    s = sub.add_parser("dataset-report", help="scan a dataset and print class counts and bad files")
    s.add_argument("--data", required=True, help="ImageFolder root (train/ and optional val/), or a manifest .csv")
    s.add_argument("--multi-label", action="store_true",
                   help="the manifest is multi-label: per-label counts and co-occurrence")
    s.add_argument("--split-ratio", type=float, default=0.8, help="train fraction when there is no val/ (default 0.8)")
    s.add_argument("--seed", type=int, default=42, help="split seed when there is no val/ (default 42)")
    s.set_defaults(func=cmd_dataset_report)

    for name, func, helptext in (
        ("train", cmd_train, "train with Ray Train (DDP over N workers; GPUs when present)"),
        ("tune", cmd_tune, "sweep hyperparameters with Ray Tune (ASHA early stopping)"),
    ):
        desc = helptext[0].upper() + helptext[1:] + "."
        if name == "tune":
            desc += textwrap.dedent("""

                The config's tune section sets the sweep (see configs/tune/):
                  tune:
                    num_samples: 4          # samples per grid point
                    scheduler: asha         # or fifo
                    metric: val/top1
                    search_space:
                      train.lr: {loguniform: [1.0e-4, 1.0e-2]}
                      model.name: {grid: [resnet18, efficientnet_b0]}
                Distributions: choice, grid, uniform, loguniform, randint, quniform. The sweep folder
                storage.path/<tune.name> gets trials.csv and a `best` pointer; rerunning resumes it.""")
        s = sub.add_parser(name, help=helptext, formatter_class=fmt, epilog=EPILOG_OVERRIDES, description=desc)
        s.add_argument("--config", help="YAML config (see configs/)")
        if name == "train":
            s.add_argument("--request", help="the platform's TrainingRequest JSON instead of (or on top of) --config")
        s.add_argument("--result-json", help="write a machine-readable summary here")
        s.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
        s.set_defaults(func=func, request=None)

    s = sub.add_parser("evaluate", help="evaluate a checkpoint on a dataset split", formatter_class=fmt,
                       description="Evaluate a checkpoint (folder, run/tune folder, or legacy .pt; local, s3:// or r2://).")
    s.add_argument("--checkpoint", required=True, help="checkpoint URI (a run folder means its best checkpoint)")
    s.add_argument("--data", required=True, help="ImageFolder root, local or s3:// / r2:// (a multi-label checkpoint: "
                                                 "a manifest CSV or DICE export)")
    s.add_argument("--split", default="val", choices=["train", "val"], help="split to evaluate (default val)")
    s.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    s.add_argument("--predictions", help="write one CSV row per image (and a confusion-matrix PNG beside it); "
                                         "multi-label: the file's labels, the predicted label set and every score")
    s.add_argument("--result-json", help="write top1, top5, loss, num_samples, per_class here (multi-label: mAP, "
                                         "f1_micro, f1_macro, loss, num_samples, thresholds, per_class)")
    _add_legacy_pt_args(s)
    s.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="inference backend (default torch); onnx exports the checkpoint once into the node cache "
                        "unless it is an export folder already (needs raytimm[onnx])")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("predict", help="label a folder, bucket prefix or list of images with Ray Data",
                       formatter_class=fmt, description=textwrap.dedent("""\
                           Batch prediction on Ray Data: list the inputs, read + decode + apply the checkpoint's
                           eval transform in CPU tasks (the same decoder and transform as evaluate and serve),
                           run the model in a pool of --concurrency actors (--num-gpus each), and write one
                           row per image: path, predicted_class, confidence, top_k_classes, top_k_confidences,
                           error. A file that cannot be read or decoded becomes a row with its error.

                           Resuming: the sorted inputs are cut into shards of --shard-size images; each shard
                           is written as one part-<n>-<hash>.<format> file, which appears only when complete
                           (renamed into place locally, one upload in a bucket). Rerunning the same command
                           after a crash skips the shards whose file exists; no row is written twice.
                           Joins the Ray cluster in RAY_ADDRESS (e.g. under `ray job submit`), else starts a
                           local Ray."""),
                       epilog=textwrap.dedent("""\
                           examples:
                             raytimm predict --checkpoint runs/quickstart --input data/demo/val --output preds/
                             raytimm predict --checkpoint r2://models/run1 --input r2://photos/2026/ \\
                                 --output r2://photos-labels/2026/ --concurrency 2,8 --num-gpus 1 --format parquet
                           """))
    s.add_argument("--checkpoint", required=True,
                   help="checkpoint folder, run or tune folder (its best checkpoint), legacy .pt (with --model-name "
                        "and --num-classes) or an ONNX export folder (with --backend onnx); local, s3:// or r2://")
    s.add_argument("--input", required=True, metavar="DIR|URI|LIST",
                   help="folder or s3:// / r2:// prefix, scanned recursively for images "
                        f"({' '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)}), or a .txt file listing one path "
                        "or URI a line (relative paths are relative to the list file)")
    s.add_argument("--output", required=True, metavar="DIR|URI", help="folder or bucket prefix for the part files")
    s.add_argument("--format", choices=out.FORMATS, default="parquet",
                   help="output format (default parquet; csv holds the top-k lists as JSON arrays)")
    s.add_argument("--top-k", type=int, default=5, help="classes per row in top_k_* (default 5)")
    s.add_argument("--batch-size", type=int, default=64, help="images per decode task batch and model call (default 64)")
    s.add_argument("--concurrency", default="1", metavar="N|MIN,MAX",
                   help="model actors: a fixed N or an autoscaling MIN,MAX range (default 1)")
    s.add_argument("--num-gpus", type=float, default=0.0,
                   help="GPUs per model actor: 0 (CPU), 1, or a fraction such as 0.5 (default 0); on GPU the "
                        "model runs in half precision and channels_last")
    s.add_argument("--cpus-per-actor", type=float, default=1.0,
                   help="CPUs reserved by each model actor; on CPU also its torch threads (default 1). "
                        "Decoding runs in separate tasks on the remaining CPUs")
    s.add_argument("--decode-cpus", type=float, default=1.0,
                   help="CPUs reserved by each read+decode task (default 1); a fraction lets decoding share "
                        "cores with CPU model actors, e.g. --cpus-per-actor 1.5 --decode-cpus 0.5 on 2 cores")
    s.add_argument("--shard-size", type=int, default=out.DEFAULT_SHARD_SIZE,
                   help="images per output part file, the unit of resuming (default %(default)s)")
    s.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="inference backend (default torch); onnx exports the checkpoint once into each node's "
                        "cache unless it is an export folder already (needs raytimm[onnx])")
    s.add_argument("--max-file-mb", type=float, default=100.0,
                   help="files larger than this become error rows (default 100); a folder's or prefix's files "
                        "are refused without being read, a list's bucket URIs once downloaded (their size is "
                        "not listed)")
    s.add_argument("--result-json", help="write the counts, output URI and images/s here")
    _add_legacy_pt_args(s)
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("export", help="export a checkpoint to ONNX, checked against PyTorch", formatter_class=fmt,
                       description=textwrap.dedent("""\
                           Export a checkpoint (folder, run/tune folder, or legacy .pt; local, s3:// or r2://) to a
                           folder holding model.onnx (batch axis dynamic) and meta.json (the checkpoint's, plus
                           format, opset, source_checkpoint and the parity figures). PyTorch and ONNX Runtime run
                           the same probe batch first; the export fails when their logits differ by more than
                           1e-3 x max |logit| + 1e-6. Needs raytimm[onnx]."""))
    s.add_argument("--checkpoint", required=True, help="checkpoint URI (a run folder means its best checkpoint)")
    s.add_argument("--format", choices=["onnx"], default="onnx", help="export format (onnx)")
    s.add_argument("--output", help="folder or bucket URI to write (default: <checkpoint folder>/onnx, "
                                    "or <name>_onnx beside a legacy .pt)")
    s.add_argument("--opset", type=int, help="ONNX opset, 18 or newer (default: raytimm.export.DEFAULT_OPSET, 20)")
    s.add_argument("--img-size", type=int, help="export for this input size instead of the checkpoint's")
    s.add_argument("--check-images", metavar="DIR",
                   help="also compare on up to 64 real images of this folder, through the serving eval transform")
    s.add_argument("--result-json", help="write the output, opset, size, export time and parity figures here")
    _add_legacy_pt_args(s)
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("serve", help="serve top-k predictions over HTTP with Ray Serve", formatter_class=fmt,
                       description=textwrap.dedent("""\
                           Start Ray Serve with the checkpoint and block until Ctrl-C or SIGTERM (both let
                           requests in flight finish, up to --drain-timeout-s; SIGTERM exits 0). Prints the URL
                           when /healthz answers. Endpoints: POST /predict, POST /inference/quick, GET /healthz,
                           GET /model, GET /openapi.json. Set RAYTIMM_API_TOKEN to require
                           `Authorization: Bearer <token>`.
                           Settings come from the --config file's serve: section (the keys `raytimm
                           config-keys` lists as serve.*); a flag given here overrides it."""))
    s.add_argument("--config", help="raytimm config YAML whose serve: section sets the defaults (flags override it)")
    from raytimm.serve.settings import add_arguments  # one flag per serve setting, docs and defaults included
    add_arguments(s)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("cache", help="list or prune this machine's cache of staged datasets and DICE conversions",
                       formatter_class=fmt, description=textwrap.dedent("""\
                           Training stages s3:// and r2:// datasets and converts DICE exports into a node-local
                           cache (data.cache_dir; each node of a cluster has its own). After a new entry is added,
                           the least recently used entries are removed until the cache fits data.cache_max_gb
                           (default 50 GB). An entry is "in use" while a process that staged or read it (a
                           training worker, `raytimm evaluate`) runs; in-use entries are never removed.
                           The folder is --cache-dir, else $RAYTIMM_CACHE_DIR, else ~/.cache/raytimm."""))
    csub = s.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = csub.add_parser("ls", help="list entries: kind, size, last use, in use, source", formatter_class=fmt,
                        description="List the cache's entries, most recently used first.")
    c.add_argument("--cache-dir", help="cache folder (default $RAYTIMM_CACHE_DIR, else ~/.cache/raytimm)")
    c.add_argument("--json", action="store_true", help="print JSON: cache_dir, total_bytes and entries")
    c.set_defaults(func=cmd_cache_ls)
    c = csub.add_parser("prune", help="remove least recently used entries that are not in use", formatter_class=fmt,
                        description=textwrap.dedent("""\
                            Remove entries that are not in use, least recently used first, until the cache
                            holds at most --max-gb (default: data.cache_max_gb's default, 50), or all of them
                            with --all. Training does this by itself after each new entry."""))
    c.add_argument("--cache-dir", help="cache folder (default $RAYTIMM_CACHE_DIR, else ~/.cache/raytimm)")
    which = c.add_mutually_exclusive_group()
    which.add_argument("--max-gb", type=float, help="size to prune down to, in GB (10^9 bytes)")
    which.add_argument("--all", action="store_true", help="remove every entry that is not in use")
    c.set_defaults(func=cmd_cache_prune)
    s = sub.add_parser("status", help="where a run stands: its progress.json, local or in a bucket",
                       formatter_class=fmt, description=textwrap.dedent("""\
                           Print a run's state, epoch, latest and best metrics from <run folder>/progress.json,
                           which every run rewrites after each epoch (also runs started by `ray job submit`)."""))
    s.add_argument("run_dir", metavar="RUN_DIR|URI", help="run folder: <storage.path>/<run.name>, local, s3:// or r2://")
    s.add_argument("--json", action="store_true", help="print progress.json as it is")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("config-keys", help="list every config key with its default and meaning")
    s.set_defaults(func=cmd_config_keys)
    return p


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
    if not verbose:
        from raytimm.logs import filter_std_streams, quiet_third_party

        quiet_third_party()
        filter_std_streams()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    _setup_logging(a.verbose)
    try:
        return int(a.func(a) or 0)
    except RaytimmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure: still one line, the traceback only on request
        if a.verbose:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"error: {type(e).__name__}: {msg} (run with -v for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

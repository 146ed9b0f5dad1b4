"""`raytimm predict`: label a folder, bucket prefix or list of images with Ray Data.

The pipeline (one Dataset, streamed):

  listing (driver) -> from_items -> map_batches(read + decode + eval transform; CPU tasks)
                   -> map_batches(_ModelActor; an actor pool, `concurrency` actors with `num_gpus` each)
                   -> iter_batches on the driver -> one part file per finished input shard (predict_output.py)

Decoding uses the shared decoder (data/images.py: pixel limit, truncated files) and the checkpoint's eval
transform (data/transforms.py), exactly as `raytimm evaluate` and Serve do; the model actors only run
Predictor.predict_tensor_batch, so scores and top-k come from the Predictor (one place for softmax, or
whatever scoring a checkpoint's task asks for). A file that cannot be read or decoded becomes a row with
its error; it never fails the job. Results are written by the driver, shard by shard, so the resume rule
(predict_output.py) holds whatever order Ray Data delivers batches in.
"""
from __future__ import annotations

import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from raytimm import predict_output as out
from raytimm import storage
from raytimm.data.extensions import IMAGE_EXTENSIONS
from raytimm.data.images import DEFAULT_MAX_PIXELS, decode_image
from raytimm.errors import ConfigError, DataError, RaytimmError

log = logging.getLogger(__name__)

DEFAULT_MAX_FILE_MB = 100.0  # bytes read per file before decoding; a bigger file is an error row
LIST_SUFFIXES = (".txt",)
READ_THREADS = 8  # bucket reads are latency-bound: a few in flight per decode task


# ----------------------------------------------------------------------------- inputs

def list_inputs(input_uri: str) -> list[tuple[str, str, int]]:
    """(path as given, URI to read, size or -1) for each input: a folder/prefix scan or a list file's lines."""
    parsed = storage.parse_uri(input_uri)
    if parsed.remote and parsed.key.lower().endswith(LIST_SUFFIXES):
        return _read_list(input_uri, parsed)
    if not parsed.remote and not os.path.isdir(parsed.key):
        if os.path.isfile(parsed.key):
            return _read_list(input_uri, parsed)
        raise DataError(f"--input {input_uri}: no such folder or list file")
    found = [f for f in storage.list_files(input_uri) if f.key.lower().endswith(IMAGE_EXTENSIONS)]
    if not found:
        raise DataError(f"--input {input_uri}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this "
                        f"{'prefix' if parsed.remote else 'folder'} or below")
    uris = [storage.join(input_uri, f.key) for f in found]
    return [(uri, uri, int(f.size)) for uri, f in zip(uris, found)]


def _read_list(input_uri: str, parsed: storage.StorageURI) -> list[tuple[str, str, int]]:
    """A text file of paths/URIs, one a line (blank lines and # comments skipped, repeats dropped).

    Relative local paths are taken relative to the list file's folder, so the list means the same thing
    wherever the job runs."""
    text = storage.read_text(input_uri)
    base = os.path.dirname(parsed.key) if not parsed.remote else None
    seen, entries = set(), []
    for lineno, line in enumerate(text.splitlines(), 1):
        given = line.strip()
        if not given or given.startswith("#") or given in seen:
            continue
        seen.add(given)
        if "://" in given and not given.lower().startswith("file://"):
            try:
                storage.parse_uri(given)
            except RaytimmError as exc:
                raise DataError(f"{input_uri} line {lineno}: {exc}") from None
            entries.append((given, given, -1))
        elif parsed.remote:
            raise DataError(f"{input_uri} line {lineno}: {given!r} is a local path in a list stored in a bucket; "
                            "list s3:// or r2:// URIs there")
        else:
            local = storage.local_path(given)
            entries.append((given, local if os.path.isabs(local) else os.path.join(base, local), -1))
    if not entries:
        raise DataError(f"--input {input_uri}: the list file names no images")
    return entries


def parse_concurrency(text: str | int) -> int | tuple[int, int]:
    """``N`` or ``MIN,MAX`` model actors (Ray Data's actor-pool size or autoscaling range)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) == 1 and nums[0] >= 1:
        return nums[0]
    if len(nums) == 2 and 1 <= nums[0] <= nums[1]:
        return nums[0], nums[1]
    raise ConfigError(f"--concurrency {text!r}: expected N or MIN,MAX actors (1 <= MIN <= MAX)")


# ----------------------------------------------------------------------------- CPU stage: read + decode + transform

_TRANSFORMS: dict = {}


def _transform_for(data_config: dict):
    """The eval transform, built once per worker process."""
    import json

    from raytimm.data.transforms import build_eval_transform

    key = json.dumps(data_config, sort_keys=True)
    if key not in _TRANSFORMS:
        import torch

        from raytimm.logs import worker_logging_setup

        worker_logging_setup()
        torch.set_num_threads(1)  # one decode task per CPU: no thread oversubscription
        _TRANSFORMS[key] = build_eval_transform(data_config)
    return _TRANSFORMS[key]


def _read(uri: str, size: int, max_bytes: int) -> bytes:
    """A file's bytes, refusing one over max_bytes before reading it when its size is known."""
    if size < 0 and not storage.is_remote(uri):
        try:
            size = os.path.getsize(storage.local_path(uri))
        except OSError as exc:
            raise DataError(f"{uri}: cannot read ({exc.strerror})") from None
    if size > max_bytes:
        raise DataError(f"{uri}: {size / 1e6:.1f} MB is over the {max_bytes / 1e6:.0f} MB per-file limit")
    data = storage.read_bytes(uri)
    if len(data) > max_bytes:
        raise DataError(f"{uri}: {len(data) / 1e6:.1f} MB is over the {max_bytes / 1e6:.0f} MB per-file limit")
    return data


def _load_one(uri: str, size: int, *, transform, max_pixels: int | None, max_bytes: int):
    """(CHW float32 array, '') or (None, error line) for one file; no exception escapes."""
    try:
        image = decode_image(_read(uri, size, max_bytes), max_pixels=max_pixels, name=uri)
        return np.asarray(transform(image), dtype=np.float32), ""
    except RaytimmError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - an unexpected failure is still one file's error row
        return None, f"{uri}: {type(exc).__name__}: {exc}"


def decode_batch(batch: dict, *, data_config: dict, max_pixels: int | None, max_bytes: int) -> dict:
    """Ray Data CPU stage: read, decode and transform a batch of files; failures become error rows."""
    transform = _transform_for(data_config)
    uris, sizes = [str(u) for u in batch["uri"]], [int(s) for s in batch["size"]]
    shape = tuple(int(v) for v in data_config["input_size"])

    def load(i: int):
        return _load_one(uris[i], sizes[i], transform=transform, max_pixels=max_pixels, max_bytes=max_bytes)

    if any(storage.is_remote(u) for u in uris):
        with ThreadPoolExecutor(min(READ_THREADS, len(uris))) as pool:
            loaded = list(pool.map(load, range(len(uris))))
    else:
        loaded = [load(i) for i in range(len(uris))]
    images = np.zeros((len(uris), *shape), dtype=np.float32)  # error rows keep zeros; the model skips them
    for i, (arr, _) in enumerate(loaded):
        if arr is not None:
            images[i] = arr
    return {"index": np.asarray(batch["index"], dtype=np.int64), "path": np.asarray(batch["path"], dtype=object),
            "image": images, "error": np.asarray([err for _, err in loaded], dtype=object)}


# ----------------------------------------------------------------------------- model stage

class ModelActor:
    """Ray Data actor: one Predictor per actor; forwards the decoded rows, passes error rows through."""

    def __init__(self, checkpoint: str, *, backend: str, top_k: int, device: str, num_threads: int,
                 model_name: str | None, num_classes: int | None):
        import torch

        from raytimm.logs import worker_logging_setup
        from raytimm.predict import Predictor

        worker_logging_setup()
        if device == "cpu":
            torch.set_num_threads(num_threads)
        self.predictor = Predictor.from_checkpoint(checkpoint, model_name=model_name, num_classes=num_classes,
                                                   device=device, backend=backend, num_threads=num_threads)
        self.top_k = top_k

    def __call__(self, batch: dict):
        import pyarrow as pa
        import torch

        errors = [str(e) for e in batch["error"]]
        ok = np.asarray([not e for e in errors])
        results: list = [None] * len(errors)
        if ok.any():
            tensor = torch.from_numpy(np.ascontiguousarray(batch["image"][ok]))
            for i, res in zip(np.flatnonzero(ok), self.predictor.predict_tensor_batch(tensor, self.top_k)):
                results[i] = res
        top = [r["top_k_predictions"] if r else None for r in results]
        return pa.table({
            "index": pa.array(batch["index"], pa.int64()),
            "path": pa.array([str(p) for p in batch["path"]], pa.string()),
            "predicted_class": pa.array([r["predicted_class"] if r else None for r in results], pa.string()),
            "confidence": pa.array([float(r["confidence"]) if r else None for r in results], pa.float64()),
            "top_k_classes": pa.array([[p["class_name"] for p in t] if t else None for t in top],
                                      pa.list_(pa.string())),
            "top_k_confidences": pa.array([[float(p["confidence"]) for p in t] if t else None for t in top],
                                          pa.list_(pa.float64())),
            "labels": pa.array([[p["class_name"] for p in r["labels"]] if r and "labels" in r else None
                                for r in results], pa.list_(pa.string())),
            "error": pa.array(errors, pa.string()),
        })


# ----------------------------------------------------------------------------- driver

def init_ray() -> bool:
    """Join RAY_ADDRESS (as under `ray job submit`) or start a local Ray of our own; True if we started it.

    address="local" rather than a bare ray.init(): that would join whatever Ray runs on this machine."""
    import ray

    if ray.is_initialized():
        return False
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=True)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
        return False
    ray.init(address="local", include_dashboard=False, **kwargs)
    return True


def _driver_predictor(checkpoint: str, *, backend: str, model_name: str | None, num_classes: int | None):
    """The checkpoint loaded once here, on CPU: fails fast with one line, and gives the data config."""
    from raytimm.predict import Predictor

    return Predictor.from_checkpoint(checkpoint, model_name=model_name, num_classes=num_classes, device="cpu",
                                     backend=backend)


def predict_to_output(checkpoint: str, input_uri: str, output_uri: str, *, fmt: str = "parquet", top_k: int = 5,
                      batch_size: int = 64, concurrency: int | tuple[int, int] = 1, num_gpus: float = 0.0,
                      cpus_per_actor: float = 1.0, decode_cpus: float = 1.0,
                      shard_size: int = out.DEFAULT_SHARD_SIZE, backend: str = "torch",
                      model_name: str | None = None, num_classes: int | None = None,
                      max_pixels: int | None = DEFAULT_MAX_PIXELS,
                      max_file_mb: float = DEFAULT_MAX_FILE_MB) -> dict:
    """Predict every input image and write part files under output_uri; returns the run's summary."""
    from raytimm.predict import check_backend

    check_backend(backend)
    out.check_format(fmt)
    if top_k < 1 or batch_size < 1:
        raise ConfigError(f"--top-k {top_k} / --batch-size {batch_size}: both must be >= 1")
    if num_gpus < 0 or cpus_per_actor < 0 or not decode_cpus > 0:
        raise ConfigError(f"--num-gpus {num_gpus:g} / --cpus-per-actor {cpus_per_actor:g} / --decode-cpus "
                          f"{decode_cpus:g}: expected >= 0 (decode CPUs > 0)")
    t_start = time.monotonic()
    # Absolute: on a joined cluster the actors run in another working folder (pitfalls-found.md, relative --checkpoint).
    checkpoint = storage.normalize(checkpoint)
    entries = list_inputs(input_uri)
    shards = out.plan_shards([given for given, _, _ in entries], shard_size, fmt)
    todo = out.pending_shards(shards, out.committed_parts(output_uri), output_uri)
    summary = {"input": input_uri, "output": storage.normalize(output_uri), "format": fmt, "checkpoint": checkpoint,
               "backend": backend, "images": len(entries), "shards": len(shards),
               "skipped_shards": len(shards) - len(todo), "predicted": 0, "errors": 0, "seconds": 0.0,
               "images_per_s": 0.0, "first_rows_s": None, "steady_images_per_s": 0.0, "total_seconds": 0.0,
               "concurrency": concurrency, "num_gpus": num_gpus}
    if not todo:
        log.info("predict: all %d shard(s) of %s are already in %s; nothing to do", len(shards), input_uri,
                 summary["output"])
        summary["total_seconds"] = round(time.monotonic() - t_start, 3)
        return summary
    storage.preflight(output_uri, want="write")  # a wrong bucket or folder fails now, not after the first shard
    pred = _driver_predictor(checkpoint, backend=backend, model_name=model_name, num_classes=num_classes)
    if backend == "torch" and pred.source:
        # Every actor loads the checkpoint the driver resolved, even if a run's `best` pointer moves meanwhile.
        checkpoint = summary["checkpoint"] = pred.source
    started = init_ray()
    try:
        counts = _run_pipeline(todo, entries, output_uri, fmt=fmt, shard_size=shard_size,
                               data_config=pred.data_config, checkpoint=checkpoint, backend=backend, top_k=top_k,
                               batch_size=batch_size, concurrency=concurrency, num_gpus=num_gpus,
                               cpus_per_actor=cpus_per_actor, decode_cpus=decode_cpus, model_name=model_name,
                               num_classes=num_classes, max_pixels=max_pixels, max_bytes=int(max_file_mb * 1e6))
    finally:
        if started:
            import ray

            ray.shutdown()
    summary.update(counts)
    summary["total_seconds"] = round(time.monotonic() - t_start, 3)
    return summary


def _run_pipeline(todo: list[out.Shard], entries: list[tuple[str, str, int]], output_uri: str, *, fmt: str,
                  shard_size: int, data_config: dict, checkpoint: str, backend: str, top_k: int, batch_size: int,
                  concurrency, num_gpus: float, cpus_per_actor: float, decode_cpus: float, model_name, num_classes,
                  max_pixels, max_bytes: int) -> dict:
    """Build and drain the Dataset, committing each shard's part file as soon as its last row arrives."""
    import ray

    from raytimm.envvars import forwarded_env

    items = [{"index": s.start + j, "path": entries[s.start + j][0], "uri": entries[s.start + j][1],
              "size": entries[s.start + j][2]} for s in todo for j in range(len(s.paths))]
    runtime_env = {"env_vars": forwarded_env()}  # workers on a joined cluster do not inherit our environment
    device = "cuda" if num_gpus > 0 else "cpu"
    t0 = time.monotonic()
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(math.ceil(len(items) / batch_size), 2000)))
    ds = ds.map_batches(decode_batch, batch_size=batch_size, batch_format="numpy", num_cpus=decode_cpus,
                        fn_kwargs={"data_config": dict(data_config), "max_pixels": max_pixels, "max_bytes": max_bytes},
                        runtime_env=runtime_env)
    pool = (ray.data.ActorPoolStrategy(size=concurrency) if isinstance(concurrency, int)
            else ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1]))
    ds = ds.map_batches(ModelActor, batch_size=batch_size, batch_format="numpy", compute=pool,
                        num_gpus=num_gpus or None, num_cpus=cpus_per_actor, runtime_env=runtime_env,
                        fn_constructor_kwargs=dict(checkpoint=checkpoint, backend=backend, top_k=top_k,
                                                   device=device, num_threads=max(1, math.ceil(cpus_per_actor)),
                                                   model_name=model_name, num_classes=num_classes))
    by_index = {s.index: s for s in todo}
    buffers: dict[int, list[dict]] = {}
    predicted = errors = 0
    first = None  # when the first rows came back: before it, actors start and load the model
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        first = first if first is not None else (time.monotonic(), batch.num_rows)
        for row in batch.to_pylist():
            shard = by_index[row["index"] // shard_size]
            rows = buffers.setdefault(shard.index, [])
            rows.append(row)
            predicted += 1
            errors += bool(row["error"])
            if len(rows) == len(shard.paths):
                out.commit_shard(output_uri, shard, out.sort_rows(buffers.pop(shard.index)), fmt)
    if buffers:  # Ray Data lost rows: say so rather than leave a shard silently missing
        missing = sorted(buffers)
        raise DataError(f"shard(s) {missing[:5]} of {output_uri} did not receive all their rows; rerun to retry them")
    end = time.monotonic()
    seconds = end - t0
    steady = (predicted - first[1]) / (end - first[0]) if first and end > first[0] else 0.0
    return {"predicted": predicted, "errors": errors, "seconds": round(seconds, 3),
            "images_per_s": round(predicted / seconds, 2) if seconds > 0 else 0.0,
            "first_rows_s": round(first[0] - t0, 3) if first else None, "steady_images_per_s": round(steady, 2)}


def format_summary(summary: dict) -> str:
    """The one-line summary the CLI prints."""
    skipped = f", {summary['skipped_shards']} shard(s) already done" if summary["skipped_shards"] else ""
    return (f"predicted {summary['predicted']} image(s) ({summary['errors']} error row(s)) in "
            f"{summary['seconds']:.1f}s, {summary['images_per_s']:.1f} images/s{skipped}; "
            f"{summary['images']} inputs in {summary['shards']} shard(s) -> {summary['output']}")

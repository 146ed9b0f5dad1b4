"""ONNX export with a parity check, and the ONNX Runtime backend of :class:`raytimm.predict.Predictor`.

An export folder (``raytimm export``) is self-describing::

    model.onnx   the graph with its weights; input ``input`` [batch, 3, H, W] float32 (batch is dynamic),
                 output ``logits`` [batch, num_classes]
    meta.json    the source checkpoint's meta.json (model_name, class_names, num_classes, data_config,
                 multi_label when set, ...) plus format "onnx", opset, source_checkpoint, parity, onnx_bytes

Every export is checked: PyTorch and ONNX Runtime (CPU provider) run the same probe batch (seeded
random tensors, plus real images through the serving eval transform with ``check_images``) and the
export fails unless, for each probe set, ``max |logit_torch - logit_onnx| <= RTOL * max |logit_torch|
+ ATOL``: fp32 rounding, scaled to the logits' size (ATOL only keeps near-zero logits of an untrained
head from demanding exact equality).

Nothing here imports onnx, onnxscript or onnxruntime at module level: they are the optional
``raytimm[onnx]`` extra, and :func:`import_onnxruntime` turns their absence into one line.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from raytimm import checkpoint as ckpt
from raytimm import storage
from raytimm.errors import CheckpointError, ConfigError, ExportError, ImageError

log = logging.getLogger(__name__)

FORMAT = "onnx"
ONNX_FILE = ckpt.ONNX_FILE
INPUT_NAME, OUTPUT_NAME = "input", "logits"
# torch 2.14's exporter (dynamo=True) implements opset 18 and up, and defaults to 20, which ONNX Runtime
# 1.2x runs; all eleven target models export and pass the parity check at 20 (BENCHMARKS.md).
DEFAULT_OPSET = 20
MIN_OPSET = 18
RTOL, ATOL = 1e-3, 1e-6
EXAMPLE_BATCH = 2  # traced with 2 and probed with PROBE_BATCH, so the probe also proves the batch axis is dynamic
PROBE_BATCH = 4
MAX_CHECK_IMAGES = 64
CACHE_VERSION = 1  # part of the node cache key: bump when the export folder's contents change meaning
CACHE_KIND = "onnx"  # <cache>/onnx/<key>/, a raytimm.cache kind
INSTALL_HINT = "pip install raytimm[onnx]"


# ----------------------------------------------------------------------------- optional dependencies

def import_onnxruntime():
    """The onnxruntime module, or a one-line ConfigError naming the extra to install."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(f"the onnx backend needs onnxruntime, which is not installed: {INSTALL_HINT}") from None
    return onnxruntime


def _require_exporter() -> None:
    """torch.onnx.export(dynamo=True) needs onnx and onnxscript; ONNX Runtime runs the parity check."""
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            raise ConfigError(f"ONNX export needs {module}, which is not installed: {INSTALL_HINT}") from None
    import_onnxruntime()


def onnx_versions() -> dict:
    """Versions of the ONNX stack, recorded in an export's meta.json."""
    import onnx
    import onnxscript

    return {"onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "onnxruntime": import_onnxruntime().__version__}


# ----------------------------------------------------------------------------- the runtime

def default_providers(device: str | torch.device | None, available: Sequence[str]) -> list[str]:
    """CUDA (then CPU) for a CUDA device, or for device=None when torch sees a GPU; else CPU only."""
    wants_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if not wants_cuda:
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        if device is not None:
            raise ConfigError(f"device={device} was asked for, but this onnxruntime has no CUDAExecutionProvider "
                              f"(available: {', '.join(available)}); install onnxruntime-gpu")
        log.warning("a GPU is visible but onnxruntime has no CUDAExecutionProvider; running ONNX on CPU")
        return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


class OnnxRunner:
    """An ONNX Runtime session behind the same ``logits(batch)`` seam as the torch backend."""

    backend = "onnx"

    def __init__(self, model: str | bytes, *, name: str, num_threads: int | None = None,
                 device: str | torch.device | None = None, providers: Sequence | None = None):
        ort = import_onnxruntime()
        opts = ort.SessionOptions()
        # The replica's (or caller's) CPUs, explicitly: ORT's default is every core of the node.
        self.num_threads = max(1, int(num_threads or torch.get_num_threads()))
        opts.intra_op_num_threads = self.num_threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # TensorRT is opt-in through `providers`: its engine build takes minutes at the first load.
        wanted = list(providers) if providers else default_providers(device, ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(model, sess_options=opts, providers=wanted)
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise CheckpointError(f"{name}: ONNX Runtime cannot load it: {_first_line(e)}") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise CheckpointError(f"{name}: expected one image input and a logits output, got "
                                  f"{len(inputs)} inputs and {len(outputs)} outputs")
        self.input_name, self.input_shape = inputs[0].name, list(inputs[0].shape)
        self.output_name, self.output_shape = outputs[0].name, list(outputs[0].shape)
        self.providers = list(self.session.get_providers())
        self.device = torch.device("cuda" if "CUDAExecutionProvider" in self.providers else "cpu")
        self._lock = threading.Lock()  # concurrent runs would oversubscribe the intra-op threads

    def check_shapes(self, data_config: dict, num_classes: int, name: str) -> None:
        """The graph must take what the eval transform makes (data_config's size) and give one logit per class."""
        want = [int(v) for v in data_config["input_size"]]
        have = self.input_shape[1:]
        if len(have) != 3 or any(isinstance(h, int) and h != w for h, w in zip(have, want)):
            raise CheckpointError(f"{name}: the ONNX input is {self.input_shape} but meta.json data_config "
                                  f"input_size is {want}")
        classes = self.output_shape[1] if len(self.output_shape) == 2 else None
        if isinstance(classes, int) and classes != int(num_classes):
            raise CheckpointError(f"{name}: the ONNX output has {classes} logits but meta.json num_classes is "
                                  f"{num_classes}")

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Forward a NCHW batch; float32 logits on CPU."""
        x = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        with self._lock:
            out = self.session.run([self.output_name], {self.input_name: x})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    def describe(self) -> dict:
        """What Predictor.metadata() reports about the backend."""
        return {"backend": self.backend, "device": str(self.device), "providers": self.providers,
                "threads": self.num_threads}


# ----------------------------------------------------------------------------- parity

@dataclasses.dataclass
class Parity:
    """PyTorch vs ONNX Runtime on one probe set."""

    probe: str  # "random" or "images"
    count: int
    max_abs_diff: float
    logit_scale: float  # max |torch logit|
    tolerance: float
    top1_agree: int

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def describe(self) -> str:
        return (f"{self.probe} ({self.count}): max |Δ logit| {self.max_abs_diff:.3g} "
                f"(tolerance {self.tolerance:.3g}), top-1 agreement {self.top1_agree}/{self.count}")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "passed": self.passed}


def compare_logits(reference: np.ndarray, candidate: np.ndarray, probe: str) -> Parity:
    """Parity figures of candidate logits against reference (PyTorch) logits."""
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if reference.shape != candidate.shape:
        raise ExportError(f"ONNX output shape {candidate.shape} != PyTorch output shape {reference.shape}")
    diff = float(np.max(np.abs(reference - candidate))) if reference.size else 0.0
    if not np.isfinite(candidate).all():
        diff = float("inf")
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    agree = int((reference.argmax(axis=1) == candidate.argmax(axis=1)).sum())
    return Parity(probe, int(reference.shape[0]), diff, scale, RTOL * scale + ATOL, agree)


def _check_image_batch(folder: str, transform) -> torch.Tensor | None:
    """Up to MAX_CHECK_IMAGES images of a local folder (sorted, recursive) through the eval transform."""
    from raytimm.data.folder import IMAGE_EXTENSIONS
    from raytimm.data.images import decode_image

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"--check-images {folder}: not a local folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    tensors = []
    for path in files[:MAX_CHECK_IMAGES]:
        try:
            tensors.append(transform(decode_image(str(path))))
        except ImageError as e:
            log.warning("check images: skipping %s", e)
    if not tensors:
        raise ConfigError(f"--check-images {folder}: no readable images ({', '.join(IMAGE_EXTENSIONS)})")
    return torch.stack(tensors)


# ----------------------------------------------------------------------------- export

@dataclasses.dataclass
class ExportResult:
    """Where an export went and what it measured."""

    output: str
    source: str
    opset: int
    input_size: list
    onnx_bytes: int
    export_s: float
    parity: list  # of Parity

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "parity": [p.to_dict() for p in self.parity]}

    def describe(self) -> str:
        checks = "; ".join(p.describe() for p in self.parity)
        return (f"exported {self.source} -> {self.output} (opset {self.opset}, input {self.input_size}, "
                f"{self.onnx_bytes / 2**20:.1f} MiB, {self.export_s:.1f} s)\nparity: {checks}")


def default_output(source: str, kind: str) -> str:
    """`<checkpoint folder>/onnx` (it travels and is pruned with its checkpoint); `<name>_onnx` beside a .pt."""
    if kind == "legacy_pt":
        parent, name = source.rstrip("/").rsplit("/", 1) if "/" in source else (".", source)
        return storage.join(parent, name.rsplit(".", 1)[0] + "_onnx")
    return storage.join(source, FORMAT)


def _check_output(output: str) -> None:
    """Refuse to write over anything but an earlier export (a checkpoint's own meta.json above all)."""
    if storage.exists(storage.join(output, ckpt.MODEL_FILE)):
        raise ExportError(f"--output {output} holds a checkpoint (model.safetensors); choose another folder")
    if storage.exists(storage.join(output, ckpt.META_FILE)) and ckpt.load_meta(output).get("format") != FORMAT:
        raise ExportError(f"--output {output} has a meta.json that is not an ONNX export's; choose another folder")


def _resize(model: torch.nn.Module, img_size: int) -> None:
    """Models built for one input size (ViT position embeddings) are resampled by timm's own set_input_size."""
    if hasattr(model, "set_input_size"):
        model.set_input_size(img_size=img_size)


def export_model(model: torch.nn.Module, path: str, *, input_size: Sequence[int], opset: int) -> None:
    """torch.onnx.export (the dynamo exporter) of an fp32 CPU model in eval mode, batch axis dynamic."""
    _require_exporter()
    example = torch.randn(EXAMPLE_BATCH, *input_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},), external_data=False,
                                verbose=False)
    program.save(path)  # weights go into the file, or beside it only past protobuf's 2 GiB limit


def export_predictor(predictor, folder: str, *, opset: int = DEFAULT_OPSET, img_size: int | None = None,
                     check_images: str | None = None) -> ExportResult:
    """Export a torch-backend Predictor into a local folder, check parity, and write meta.json last."""
    if predictor.backend != "torch" or predictor.device.type != "cpu":
        raise ExportError("export needs the PyTorch model on CPU in float32 (Predictor with backend torch, device cpu)")
    if int(opset) < MIN_OPSET:
        raise ConfigError(f"--opset {opset}: torch's ONNX exporter needs {MIN_OPSET} or newer "
                          f"(default {DEFAULT_OPSET})")
    from raytimm.data.transforms import build_eval_transform, check_data_config

    model = predictor.model
    data_config = dict(predictor.data_config)
    if img_size:
        _resize(model, int(img_size))
        data_config["input_size"] = [3, int(img_size), int(img_size)]
    input_size = [3, *check_data_config(data_config)]
    path = os.path.join(folder, ONNX_FILE)
    start = time.perf_counter()
    try:
        export_model(model, path, input_size=input_size, opset=int(opset))
    except (ConfigError, ExportError):
        raise
    except Exception as e:  # noqa: BLE001 - the exporter raises many types; one line names the checkpoint
        raise ExportError(f"cannot export {predictor.source} ({predictor.model_name}) to ONNX: "
                          f"{type(e).__name__}: {_first_line(e)}") from e
    export_s = time.perf_counter() - start

    runner = OnnxRunner(path, name=path, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    probes = {"random": torch.randn(PROBE_BATCH, *input_size, generator=generator)}
    if check_images:
        probes["images"] = _check_image_batch(check_images, build_eval_transform(data_config))
    parity = []
    for probe, batch in probes.items():
        with torch.inference_mode():
            reference = model(batch).float().numpy()
        parity.append(compare_logits(reference, runner.logits(batch).numpy(), probe))
    if not all(p.passed for p in parity):
        raise ExportError(f"ONNX export of {predictor.source} does not match PyTorch (opset {opset}): "
                          + "; ".join(p.describe() for p in parity))

    meta = dict(predictor.meta)
    meta.update(model_name=predictor.model_name, num_classes=predictor.num_classes,
                class_names=list(predictor.class_names), data_config=data_config, format=FORMAT, opset=int(opset),
                source_checkpoint=predictor.source, source_kind=predictor.kind, onnx_bytes=os.path.getsize(path),
                input_name=INPUT_NAME, output_name=OUTPUT_NAME, tolerance={"rtol": RTOL, "atol": ATOL},
                parity=[p.to_dict() for p in parity], versions={**(meta.get("versions") or {}), **onnx_versions()})
    meta.pop("img_size", None)  # the graph fixes the size; data_config says which
    storage.write_bytes(os.path.join(folder, ckpt.META_FILE),
                        json.dumps(meta, indent=2, sort_keys=True, default=str).encode())
    return ExportResult(output=folder, source=str(predictor.source), opset=int(opset), input_size=input_size,
                        onnx_bytes=os.path.getsize(path), export_s=export_s, parity=parity)


def _publish(local_dir: str, output: str) -> None:
    """Copy an export to its destination, meta.json last (and the old one removed first)."""
    meta_uri = storage.join(output, ckpt.META_FILE)
    if storage.exists(meta_uri):
        storage.delete(meta_uri)  # so a reader never pairs an old meta.json with a new model.onnx
    for name in sorted(os.listdir(local_dir)):
        if name != ckpt.META_FILE:
            storage.upload(os.path.join(local_dir, name), storage.join(output, name))
    storage.upload(os.path.join(local_dir, ckpt.META_FILE), meta_uri)


def export_checkpoint(checkpoint: str, *, output: str | None = None, opset: int | None = None,
                      img_size: int | None = None, check_images: str | None = None, model_name: str | None = None,
                      num_classes: int | None = None, class_names: Sequence[str] | None = None) -> ExportResult:
    """`raytimm export`: any checkpoint Serve takes -> a checked ONNX export folder, local or in a bucket."""
    from raytimm.predict import Predictor

    _require_exporter()
    predictor = Predictor.from_checkpoint(checkpoint, model_name=model_name, num_classes=num_classes,
                                          class_names=class_names, device="cpu")
    output = output or default_output(str(predictor.source), predictor.kind)
    _check_output(output)
    with tempfile.TemporaryDirectory(prefix="raytimm-export-") as tmp:
        result = export_predictor(predictor, tmp, opset=opset or DEFAULT_OPSET, img_size=img_size,
                                  check_images=check_images)
        _publish(tmp, output)
    result.output = storage.normalize(output)
    return result


# ----------------------------------------------------------------------------- the backend's loader

def _file_fingerprint(uri: str) -> str:
    """sha256 of a local file; size and ETag of an object (an ETag is content-derived; hashing would mean
    downloading the weights on every replica start just to find the cached export)."""
    if not storage.is_remote(uri):
        digest = hashlib.sha256()
        with open(storage.normalize(uri), "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    parent, name = uri.rstrip("/").rsplit("/", 1)
    for info in storage.list_files(parent):
        if info.key == name:
            return f"{info.size}:{info.etag}"
    raise CheckpointError(f"checkpoint file not found: {uri}")


def content_key(resolved: ckpt.ResolvedCheckpoint, *, model_name: str | None = None,
                num_classes: int | None = None) -> str:
    """Node-cache key of a checkpoint's ONNX export: its weights and meta.json (or a .pt and its arguments)."""
    digest = hashlib.sha256(f"raytimm-onnx-{CACHE_VERSION}-opset{DEFAULT_OPSET}\0".encode())
    if resolved.kind == "legacy_pt":
        digest.update(f"{_file_fingerprint(resolved.uri)}\0{model_name}\0{num_classes}".encode())
    else:
        digest.update(_file_fingerprint(ckpt.join_uri(resolved.uri, ckpt.MODEL_FILE)).encode() + b"\0")
        digest.update(storage.read_bytes(ckpt.join_uri(resolved.uri, ckpt.META_FILE)))
    return digest.hexdigest()[:32]


def cached_export(resolved: ckpt.ResolvedCheckpoint, *, cache_dir: str | None = None, model_name: str | None = None,
                  num_classes: int | None = None) -> Path:
    """`<cache>/onnx/<content key>/`: the checkpoint's export, made (and parity-checked) once per node.

    A raytimm.cache entry (kind onnx, listed and evicted by `raytimm cache`): made under the entry's lock,
    so two replicas export once, and marked used; the caller releases it once ONNX Runtime has read it.
    """
    from raytimm import cache
    from raytimm.predict import Predictor

    root = Path(cache.cache_root(cache_dir)) / CACHE_KIND
    final = root / content_key(resolved, model_name=model_name, num_classes=num_classes)
    with cache.entry_lock(final):
        if not (final / ckpt.META_FILE).is_file():  # else another replica made it, maybe while we waited
            tmp = tempfile.mkdtemp(prefix=f".{final.name}.", dir=root)  # dot names are not cache entries
            try:
                start = time.perf_counter()
                predictor = Predictor.from_checkpoint(resolved.uri, model_name=model_name, num_classes=num_classes,
                                                      device="cpu")
                result = export_predictor(predictor, tmp)
                os.replace(tmp, final)  # the folder appears complete or not at all
                log.info("exported %s to ONNX in %.1f s (cached at %s); %s", resolved.uri,
                         time.perf_counter() - start, final, "; ".join(p.describe() for p in result.parity))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        cache.mark_used(final, source=resolved.uri)
    return final


def _check_export_meta(meta: dict, folder: str) -> None:
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder}/meta.json: format is {meta.get('format')!r}, not {FORMAT!r}")
    for key in ("model_name", "num_classes", "data_config"):
        if not meta.get(key):
            raise CheckpointError(f"{folder}/meta.json has no {key!r}")


@contextmanager
def _local_folder(uri: str) -> Iterator[str]:
    """A local copy of an export folder (downloaded to a temp dir when remote; ORT reads it once)."""
    if not storage.is_remote(uri):
        yield storage.normalize(uri)
        return
    with tempfile.TemporaryDirectory(prefix="raytimm-onnx-") as tmp:
        storage.download(uri, tmp)
        yield tmp


def load_onnx_predictor(resolved: ckpt.ResolvedCheckpoint, *, model_name: str | None = None,
                        num_classes: int | None = None, class_names: Sequence[str] | None = None,
                        device: str | torch.device | None = None, num_threads: int | None = None,
                        cache_dir: str | None = None, providers: Sequence | None = None, **predictor_kwargs):
    """A Predictor on ONNX Runtime: an export folder as is, any other checkpoint through the node cache."""
    from raytimm.predict import Predictor, check_legacy_args

    import_onnxruntime()  # before any download or export work
    if resolved.kind == "legacy_pt":
        check_legacy_args(resolved.uri, model_name, num_classes)
    folder = resolved.uri if resolved.kind == "onnx" else str(cached_export(
        resolved, cache_dir=cache_dir, model_name=model_name, num_classes=num_classes))
    try:
        meta = ckpt.load_meta(folder)
        _check_export_meta(meta, folder)
        with _local_folder(folder) as local:
            name = ckpt.join_uri(folder, ONNX_FILE)
            runner = OnnxRunner(os.path.join(local, ONNX_FILE), name=name, num_threads=num_threads, device=device,
                                providers=providers)
    finally:
        if resolved.kind != "onnx":
            from raytimm import cache
            cache.release(folder)  # ONNX Runtime holds the model in memory now: the entry may be evicted
    n = int(meta["num_classes"])
    runner.check_shapes(meta["data_config"], n, name)
    names = list(class_names) if class_names else meta.get("class_names") or [str(i) for i in range(n)]
    if len(names) != n:
        raise CheckpointError(f"{folder}/meta.json: {len(names)} class_names but num_classes={n}")
    kind = resolved.kind
    meta = dict(meta, onnx_export=folder)
    return Predictor(None, model_name=str(meta["model_name"]), class_names=names, data_config=meta["data_config"],
                     runner=runner, source=resolved.uri, kind=kind, meta=meta, **predictor_kwargs)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__

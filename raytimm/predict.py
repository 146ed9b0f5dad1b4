"""Predictor: checkpoint (or pretrained timm model) -> preprocess -> batched top-k. No Ray here.

The same decoder (``data/images.py``) and the same eval transform (``data/transforms.py``, built
from the checkpoint's stored data config) as training validation, so evaluate and Serve see exactly
what validation saw. Used by ``raytimm evaluate`` and by the Serve deployment.
"""
from __future__ import annotations

import csv
import logging
import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from raytimm import checkpoint as ckpt
from raytimm.data.images import DEFAULT_MAX_PIXELS, decode_image
from raytimm.data.transforms import build_eval_transform, resolve_data_config
from raytimm.errors import CheckpointError, ConfigError, DataError, ImageError

log = logging.getLogger(__name__)

TASK_TYPE = "image_classification"
MULTI_LABEL_TASK_TYPE = "multi_label_classification"
IMAGENET_CLASSES = 1000
BACKENDS = ("torch", "onnx")


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def imagenet_class_names() -> list[str]:
    """Human-readable ImageNet-1k names from timm's bundled info (first synonym: 'tench', 'goldfish', ...)."""
    from timm.data import ImageNetInfo

    descriptions = ImageNetInfo("imagenet-1k").label_descriptions()
    return [d.split(",")[0].strip() for d in descriptions]


def _build(model_name: str, num_classes: int, img_size: int | None = None, **kwargs) -> nn.Module:
    from raytimm.model import build_model
    return build_model(model_name, num_classes=num_classes, img_size=img_size, **kwargs)


def _meta_img_size(meta: dict) -> int | None:
    """The training-time img_size (needed at construction by ViT-style models)."""
    if meta.get("img_size"):
        return int(meta["img_size"])
    model_cfg = (meta.get("config") or {}).get("model") or {}
    return int(model_cfg["img_size"]) if model_cfg.get("img_size") else None


def check_backend(backend: str) -> str:
    """The backend name, or a ConfigError listing the valid ones."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    return backend


def check_legacy_args(uri: str, model_name: str | None, num_classes: int | None) -> None:
    """A legacy .pt has no meta.json: the architecture and class count must come from the caller."""
    missing = [k for k, v in (("model_name", model_name), ("num_classes", num_classes)) if not v]
    if missing:
        raise ConfigError(f"legacy checkpoint {uri} needs model_name and num_classes "
                          f"(missing: {', '.join(missing)})")


class TorchRunner:
    """Eager PyTorch behind the backend seam: ``logits(batch)`` and ``describe()``, like export.OnnxRunner."""

    backend = "torch"

    def __init__(self, model: nn.Module, device: str | torch.device | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        # Half precision and channels_last only pay off (and are only exact enough) on GPU.
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.memory_format = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        model = model.to(self.device, dtype=self.dtype, memory_format=self.memory_format).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self._lock = threading.Lock()  # forward passes from several threads would fight over torch threads

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Forward a NCHW batch; float32 logits on CPU."""
        x = batch.to(self.device, dtype=self.dtype, memory_format=self.memory_format, non_blocking=True)
        with self._lock, torch.inference_mode():
            out = self.model(x)
        return out.float().cpu()

    def describe(self) -> dict:
        """What Predictor.metadata() reports about the backend."""
        return {"backend": self.backend, "device": str(self.device)}


class Predictor:
    """A loaded model with its class names and eval transform; thread-safe for inference.

    The forward pass is a runner's (the backend seam): TorchRunner (eager PyTorch) or export.OnnxRunner
    (ONNX Runtime). Everything around it (decode, eval transform, scores, top-k answers) is shared.
    """

    def __init__(self, model: nn.Module | None, *, model_name: str, class_names: Sequence[str], data_config: dict,
                 device: str | torch.device | None = None, source: str | None = None, kind: str = "folder",
                 meta: dict | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS, batch_size: int = 32,
                 runner=None):
        self.runner = runner if runner is not None else TorchRunner(model, device)
        self.backend = self.runner.backend
        self.device = self.runner.device
        self.model = getattr(self.runner, "model", None)  # the nn.Module with the torch backend, else None
        self.model_name = model_name
        self.class_names = [str(c) for c in class_names]
        self.num_classes = len(self.class_names)
        self.data_config = dict(data_config)
        self.source = source
        self.kind = kind
        self.meta = dict(meta or {})
        self.max_pixels = max_pixels
        self.batch_size = max(1, int(batch_size))
        self.transform = build_eval_transform(self.data_config)
        # meta.json's contract (docs/internals.md, "Multi-label checkpoints"): sigmoid scores, a threshold per label.
        self.multi_label = bool(self.meta.get("multi_label"))
        self.thresholds = meta_thresholds(self.meta, self.num_classes, source) if self.multi_label else None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_checkpoint(cls, uri: str, *, model_name: str | None = None, num_classes: int | None = None,
                        device: str | torch.device | None = None, class_names: Sequence[str] | None = None,
                        max_pixels: int | None = DEFAULT_MAX_PIXELS, batch_size: int = 32, backend: str = "torch",
                        num_threads: int | None = None, cache_dir: str | None = None) -> "Predictor":
        """Load a checkpoint folder, run/tune folder (via `best`) or legacy `.pt` (needs model_name, num_classes).

        backend="onnx" runs ONNX Runtime (num_threads intra-op threads, default torch's): an export folder
        as is, any other checkpoint exported once into the node cache (cache_dir, see export.cached_export).
        """
        if check_backend(backend) == "onnx":
            from raytimm.export import import_onnxruntime, load_onnx_predictor

            import_onnxruntime()  # the missing extra is the first thing to say
            return load_onnx_predictor(ckpt.resolve_checkpoint(uri), model_name=model_name, num_classes=num_classes,
                                       class_names=class_names, device=device, num_threads=num_threads,
                                       cache_dir=cache_dir, max_pixels=max_pixels, batch_size=batch_size)
        resolved = ckpt.resolve_checkpoint(uri)
        if resolved.kind == "onnx":
            raise CheckpointError(f"{resolved.uri} is an ONNX export: load it with backend onnx, or load its "
                                  "source_checkpoint (meta.json) with backend torch")
        if resolved.kind == "legacy_pt":
            return cls._from_legacy(resolved.uri, model_name=model_name, num_classes=num_classes, device=device,
                                    class_names=class_names, max_pixels=max_pixels, batch_size=batch_size)
        meta = ckpt.load_meta(resolved.uri)
        for key in ("model_name", "num_classes"):
            if not meta.get(key):
                raise CheckpointError(f"{resolved.uri}/meta.json has no {key!r}")
        name, n = str(meta["model_name"]), int(meta["num_classes"])
        model = _build(name, n, _meta_img_size(meta))
        _load_state(model, ckpt.load_model_state(resolved.uri), resolved.uri, name)
        names = meta.get("class_names") or [str(i) for i in range(n)]
        if len(names) != n:
            raise CheckpointError(f"{resolved.uri}/meta.json: {len(names)} class_names but num_classes={n}")
        data_config = meta.get("data_config") or resolve_data_config(model, img_size=_meta_img_size(meta))
        return cls(model, model_name=name, class_names=names, data_config=data_config, device=device,
                   source=resolved.uri, kind="folder", meta=meta, max_pixels=max_pixels, batch_size=batch_size)

    @classmethod
    def _from_legacy(cls, uri: str, *, model_name, num_classes, device, class_names, max_pixels,
                     batch_size) -> "Predictor":
        """The platform's legacy `.pt`: architecture and class count come from the caller."""
        check_legacy_args(uri, model_name, num_classes)
        n = int(num_classes)
        state = ckpt.load_legacy_pt(uri)
        model = _build(str(model_name), n)
        _load_state(model, state, uri, str(model_name))
        names = list(class_names) if class_names else [str(i) for i in range(n)]
        if len(names) != n:
            raise ConfigError(f"{len(names)} class names given for num_classes={n}")
        return cls(model, model_name=str(model_name), class_names=names, data_config=resolve_data_config(model),
                   device=device, source=uri, kind="legacy_pt",
                   meta={"model_name": str(model_name), "num_classes": n}, max_pixels=max_pixels,
                   batch_size=batch_size)

    @classmethod
    def pretrained(cls, model_name: str, *, device: str | torch.device | None = None,
                   weights_dir: str | None = None, pretrained_file: str | None = None,
                   max_pixels: int | None = DEFAULT_MAX_PIXELS, batch_size: int = 32) -> "Predictor":
        """An ImageNet-1k timm model: weights from pretrained_file, $RAYTIMM_WEIGHTS_DIR, then the hub."""
        model = _build(model_name, IMAGENET_CLASSES, pretrained=True, pretrained_file=pretrained_file,
                       weights_dir=weights_dir)
        return cls(model, model_name=model_name, class_names=imagenet_class_names(),
                   data_config=resolve_data_config(model), device=device, source=f"pretrained:{model_name}",
                   kind="pretrained", meta={"model_name": model_name, "num_classes": IMAGENET_CLASSES},
                   max_pixels=max_pixels, batch_size=batch_size)

    # ------------------------------------------------------------------ inference

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 RGB array -> CHW float tensor via the checkpoint's eval transform."""
        return self.transform(image)

    def decode(self, image: np.ndarray | bytes | str | os.PathLike, name: str | None = None) -> np.ndarray:
        """Bytes or a path through the shared decoder; arrays pass through (grayscale is expanded)."""
        if isinstance(image, np.ndarray):
            if image.ndim == 2:
                image = np.repeat(image[:, :, None], 3, axis=2)
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise DataError(f"{name or 'image'}: expected an HxWx3 uint8 RGB array, got "
                                f"{image.dtype} {tuple(image.shape)}")
            return image
        return decode_image(image, max_pixels=self.max_pixels, name=name)

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Forward a NCHW batch through the backend; float32 logits on CPU."""
        return self.runner.logits(batch)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Class scores of logits: softmax, or an independent sigmoid per label for a multi-label model."""
        return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=1)

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Class scores of a NCHW batch (``scores`` of its logits)."""
        return self.scores(self.logits(batch))

    def label_thresholds(self, threshold: float | None = None) -> list[float]:
        """Per-label thresholds of a multi-label model: ``threshold`` for every label, else meta.json's."""
        if not self.multi_label:
            raise ConfigError(f"{self.source or self.model_name} is a single-label model: a threshold applies "
                              f"to multi-label models only")
        if threshold is None:
            return list(self.thresholds)
        return [check_threshold(threshold)] * self.num_classes

    def format_topk(self, probs: torch.Tensor, top_k: int | Sequence[int],
                    threshold: float | None | Sequence[float | None] = None) -> list[dict]:
        """Score rows -> HTTP-contract dicts; top_k (per row or shared) clamped to [1, num_classes].

        A multi-label model's dicts add ``labels`` (every label whose score reaches its threshold, by score)
        with ``threshold`` (per row or shared; None = meta.json's) overriding the stored thresholds.
        """
        ks = [top_k] * probs.shape[0] if isinstance(top_k, int) else list(top_k)
        if threshold is None or isinstance(threshold, (int, float)):
            threshold = [threshold] * len(ks)
        kmax = self.clamp_top_k(max(ks)) if ks else 1
        values, indices = torch.topk(probs, kmax, dim=1)
        out = []
        for row, k in enumerate(ks):
            k = self.clamp_top_k(k)
            preds = [{"class_id": int(indices[row, j]), "class_name": self.class_names[int(indices[row, j])],
                      "confidence": float(values[row, j])} for j in range(k)]
            answer = {"task_type": TASK_TYPE, "top_k_predictions": preds,
                      "predicted_class": preds[0]["class_name"], "confidence": preds[0]["confidence"]}
            if self.multi_label:
                answer.update(task_type=MULTI_LABEL_TASK_TYPE,
                              labels=self.labels_over(probs[row], self.label_thresholds(threshold[row])))
            elif threshold[row] is not None:
                self.label_thresholds(threshold[row])  # raises: a single-label model has no thresholds
            out.append(answer)
        return out

    def labels_over(self, scores: torch.Tensor, thresholds: Sequence[float]) -> list[dict]:
        """The labels of one score row that reach their threshold, highest score first."""
        hits = [j for j in range(self.num_classes) if float(scores[j]) >= thresholds[j]]
        hits.sort(key=lambda j: (-float(scores[j]), j))
        return [{"class_id": j, "class_name": self.class_names[j], "confidence": float(scores[j])} for j in hits]

    def clamp_top_k(self, top_k: int) -> int:
        """top_k limited to 1..num_classes."""
        return max(1, min(int(top_k), self.num_classes))

    def predict_tensor_batch(self, batch: torch.Tensor, top_k: int | Sequence[int] = 5,
                             threshold: float | None | Sequence[float | None] = None) -> list[dict]:
        """Top-k dicts for an already preprocessed NCHW batch (Serve's batched path); see ``format_topk``."""
        return self.format_topk(self.probabilities(batch), top_k, threshold)

    def predict(self, images: Sequence[np.ndarray | bytes | str | os.PathLike], top_k: int = 5,
                threshold: float | None = None) -> list[dict]:
        """Top-k dicts for images (arrays, encoded bytes or paths), in order, in batches of batch_size."""
        if threshold is not None:
            self.label_thresholds(threshold)  # checked before any image is decoded
        results: list[dict] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            tensors = [self.preprocess(self.decode(img, name=f"image {start + i}")) for i, img in enumerate(chunk)]
            results.extend(self.predict_tensor_batch(torch.stack(tensors), top_k, threshold))
        return results

    def metadata(self) -> dict:
        """What GET /model reports: model, classes, checkpoint, metrics, data config, versions, backend."""
        return {
            "model_name": self.model_name,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "checkpoint": self.source,
            "kind": self.kind,
            "epoch": self.meta.get("epoch"),
            "metrics": self.meta.get("metrics") or {},
            "data_config": self.data_config,
            "versions": self.meta.get("versions") or {},
            "task_type": MULTI_LABEL_TASK_TYPE if self.multi_label else TASK_TYPE,
            "multi_label": self.multi_label,
            "thresholds": list(self.thresholds) if self.multi_label else None,
            **self.runner.describe(),  # backend, device (and the ONNX providers and threads)
        }


def check_threshold(value) -> float:
    """A score threshold: a finite number in [0, 1] (ConfigError naming it otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"threshold must be a number between 0 and 1, got {value!r}")
    return float(value)


def meta_thresholds(meta: dict, num_classes: int, source: str | None) -> list[float]:
    """meta.json's per-label thresholds (0.5 each when absent); a wrong count or value is a CheckpointError."""
    from raytimm.metrics import DEFAULT_THRESHOLD

    raw = meta.get("thresholds")
    if raw is None:
        return [DEFAULT_THRESHOLD] * num_classes
    try:
        if len(raw) != num_classes:
            raise ValueError(f"{len(raw)} thresholds for {num_classes} classes")
        return [check_threshold(t) for t in raw]
    except (TypeError, ValueError, ConfigError) as exc:
        raise CheckpointError(f"{source or 'checkpoint'}/meta.json: thresholds must be one number in [0, 1] "
                              f"per class: {exc}") from None


def _load_state(model: nn.Module, state: dict, uri: str, model_name: str) -> None:
    """load_state_dict strictly; a mismatch names the checkpoint, the model and example keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        detail = "; ".join([*(f"shape {s}" for s in shapes[:2]), *(f"missing {k}" for k in missing[:2]),
                            *(f"unexpected {k}" for k in unexpected[:2])])
        raise CheckpointError(f"checkpoint {uri} does not fit model {model_name!r} with "
                              f"{_head_classes(own)} classes: {detail}")
    model.load_state_dict(state, strict=True)


def _head_classes(state: dict) -> str:
    """Best-effort class count from the last 2-D weight (for error messages)."""
    for key in reversed(list(state)):
        if key.endswith("weight") and state[key].ndim == 2:
            return str(state[key].shape[0])
    return "?"


# ----------------------------------------------------------------------------- evaluate

def _stage_data(data_uri: str, cache_dir: str | None) -> str:
    """Local folder for a dataset path or bucket URI: staged like training does, into ``<cache>/datasets``,
    so evaluating on the node that trained reuses the copy."""
    from raytimm import storage
    from raytimm.data.loaders import stage_dataset
    from raytimm.model import DEFAULT_CACHE_DIR

    cache = cache_dir or os.environ.get("RAYTIMM_CACHE_DIR") or DEFAULT_CACHE_DIR
    return storage.normalize(stage_dataset(data_uri, cache))


def _split_samples(root: str, split: str, meta: dict) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names and (path, label) samples of one split, using the training run's split settings."""
    from raytimm.data.folder import scan_imagefolder
    data_cfg = (meta.get("config") or {}).get("data") or {}
    scan = scan_imagefolder(root, split_ratio=float(data_cfg.get("split_ratio", 0.8)),
                            seed=int(data_cfg.get("split_seed", 42)), verify=False)
    if split not in ("val", "train", "all"):
        raise ConfigError(f"split={split!r}: expected 'val', 'train' or 'all'")
    samples = {"val": scan.val, "train": scan.train, "all": list(scan.train) + list(scan.val)}[split]
    if not samples:
        raise DataError(f"{root}: the {split!r} split has no images")
    return list(scan.class_names), [(str(p), int(y)) for p, y in samples]


def _check_classes(dataset_classes: list[str], predictor: Predictor, data_uri: str) -> None:
    """Dataset and checkpoint must agree on class names and order."""
    if dataset_classes == predictor.class_names:
        return
    only_data = sorted(set(dataset_classes) - set(predictor.class_names))
    only_ckpt = sorted(set(predictor.class_names) - set(dataset_classes))
    if only_data or only_ckpt:
        raise DataError(f"classes of {data_uri} differ from checkpoint {predictor.source}: only in the data "
                        f"{only_data[:10]}, only in the checkpoint {only_ckpt[:10]}")
    raise DataError(f"classes of {data_uri} are in a different order than in checkpoint {predictor.source}")


def evaluate_checkpoint(checkpoint_uri: str, data_uri: str, *, split: str = "val", batch_size: int = 64,
                        predictions_csv: str | os.PathLike | None = None, model_name: str | None = None,
                        num_classes: int | None = None, device: str | torch.device | None = None,
                        cache_dir: str | None = None, predictor: Predictor | None = None, backend: str = "torch",
                        num_threads: int | None = None) -> dict:
    """Top-1/top-5/loss/per-class accuracy and confusion matrix of a checkpoint on an ImageFolder split.

    A multi-label checkpoint (meta.json ``multi_label``) is scored by evaluate_multilabel instead: mAP, F1, per label.
    """
    check_backend(backend)
    pred = predictor or Predictor.from_checkpoint(checkpoint_uri, model_name=model_name, num_classes=num_classes,
                                                  device=device, batch_size=batch_size, backend=backend,
                                                  num_threads=num_threads, cache_dir=cache_dir)
    if pred.multi_label:
        from raytimm.evaluate_multilabel import evaluate_multilabel_checkpoint

        return evaluate_multilabel_checkpoint(pred, str(data_uri), split=split, batch_size=batch_size,
                                              predictions_csv=predictions_csv, cache_dir=cache_dir)
    root = _stage_data(str(data_uri), cache_dir)
    classes, samples = _split_samples(root, split, pred.meta)
    if pred.kind == "legacy_pt" and pred.class_names == [str(i) for i in range(pred.num_classes)]:
        if len(classes) != pred.num_classes:
            raise DataError(f"{data_uri} has {len(classes)} classes but num_classes={pred.num_classes}")
        pred.class_names = classes  # a legacy .pt has no names: take the dataset's
    _check_classes(classes, pred, str(data_uri))

    from raytimm.metrics import ClassificationSums, per_class_accuracy  # the same counting as training validation

    sums = ClassificationSums(pred.num_classes, torch.device("cpu"))
    rows, skipped = [], []
    for chunk, logits in logit_batches(pred, samples, root, batch_size, skipped):
        top1 = sums.add(logits, torch.tensor([y for _, y in chunk]))
        conf = torch.softmax(logits, dim=1).gather(1, top1[:, None]).squeeze(1)
        for (path, y), p, c in zip(chunk, top1.tolist(), conf.tolist()):
            rows.append((os.path.relpath(path, root), classes[y], pred.class_names[p], c))

    if not rows:
        raise DataError(f"{data_uri}: none of the {len(samples)} images of the {split!r} split could be read")
    if skipped:
        log.warning("evaluate: skipped %d unreadable image(s), e.g. %s", len(skipped), skipped[0]["file"])
    metrics = sums.result()
    # Classes without images in this split have no accuracy; they are left out rather than shown as 0.
    per_class = {r["class"]: r["top1"] for r in per_class_accuracy(metrics["confusion_matrix"], pred.class_names)
                 if r["support"]}
    if predictions_csv:
        write_predictions_csv(predictions_csv, rows)
    return {
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "loss": metrics["loss"],
        "num_samples": metrics["num_samples"],
        "per_class": per_class,
        "confusion_matrix": metrics["confusion_matrix"],
        **evaluation_source(pred, split=split, predictions_csv=predictions_csv, skipped=skipped),
    }


def evaluation_source(pred: Predictor, *, split: str, predictions_csv, skipped: list) -> dict:
    """The part of an evaluation's result that says what was evaluated, how, and what was skipped."""
    return {
        "class_names": list(pred.class_names),
        "checkpoint": pred.source,
        "backend": pred.backend,
        "split": split,
        "predictions_csv": str(predictions_csv) if predictions_csv else None,
        "skipped": skipped,
    }


def logit_batches(pred: Predictor, samples: Sequence[tuple], root: str, batch_size: int, skipped: list):
    """Yield (samples, logits) per batch of (path, target) samples; unreadable files go to ``skipped``, not fatal."""
    for start in range(0, len(samples), batch_size):
        chunk, tensors = [], []
        for path, target in samples[start:start + batch_size]:
            try:
                tensors.append(pred.preprocess(decode_image(path, max_pixels=pred.max_pixels)))
                chunk.append((path, target))
            except ImageError as exc:
                skipped.append({"file": os.path.relpath(path, root), "reason": str(exc)})
        if chunk:
            yield chunk, pred.logits(torch.stack(tensors))


def write_predictions_csv(path: str | os.PathLike, rows: Sequence[tuple[str, str, str, float]]) -> str:
    """One row per image: file (relative to the data root), label, predicted class, confidence."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label", "predicted", "confidence"])
        for file, label, predicted, confidence in rows:
            writer.writerow([Path(file).as_posix(), label, predicted, f"{confidence:.8f}"])
    return str(path)

"""Typed run configuration: YAML file, then dotted ``key=value`` overrides, then validation.

No torch or ray imports here, so the CLI can validate a config in milliseconds.

Every field has a default and a one-line doc (``field(..., metadata={"doc": ...})``).
Unknown keys are errors that name the closest valid key; wrong types name the key,
the value and the expected type; out-of-range values name the key and the range.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from raytimm.errors import ConfigError
from raytimm.metrics import DEFAULT_METRIC, MULTI_LABEL_ONLY, SINGLE_LABEL_ONLY  # torch-free (see metrics.py)
from raytimm.metrics import RANKING_METRICS as METRIC_NAMES
from raytimm.serve.settings import ServeSettings, section_docs, validate_section


def _f(default: Any, doc: str, **kw: Any) -> Any:
    """A dataclass field with a doc string; mutable defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata={"doc": doc}, **kw)
    return field(default=default, metadata={"doc": doc}, **kw)


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is out of range: expected {expected}")


@dataclass
class DataSection:
    path: str = _f("", "Dataset: an ImageFolder root (train/ and optional val/), a DICE export, or a manifest .csv; local, s3:// or r2://.")
    format: Literal["imagefolder", "dice", "manifest"] = _f("imagefolder", "Dataset layout: imagefolder, dice (converted into the cache) or manifest (CSV file,labels[,split]; files relative to its folder).")
    multi_label: bool = _f(False, "Multi-label: an image has a set of labels (manifest or dice); sigmoid/BCE, val/mAP, thresholds in meta.json.")
    balance: Literal["none", "sampler", "loss"] = _f("none", "Single-label class imbalance: sampler (class-balanced draws) or loss (inverse-frequency class weights, mean 1).")
    split_ratio: float = _f(0.8, "Train fraction when the dataset has no val/ folder (stratified, deterministic split).")
    split_seed: int = _f(42, "Seed of the train/val split when there is no val/ folder.")
    num_workers: int = _f(2, "DataLoader worker processes per training worker.")
    cache_dir: str = _f("~/.cache/raytimm", "Node-local cache for staged datasets, DICE conversions and weights.")
    cache_max_gb: float = _f(50.0, "Size limit (GB) of the cache's staged datasets and DICE conversions: after a new "
                                   "one, the least recently used entries not in use are removed. Must be > 0.")
    max_image_pixels: int = _f(64_000_000, "Images with more pixels are refused (decompression-bomb guard).")
    verify_images: bool = _f(True, "Open every image header at scan time so unreadable files are reported, not crashed on.")
    rrc: bool = _f(True, "Train augmentation: RandomResizedCrop (else a plain resize to the input size).")
    rrc_scale: list[float] = _f([0.08, 1.0], "RandomResizedCrop area scale range [min, max].")
    rrc_ratio: list[float] = _f([0.75, 1.3333333], "RandomResizedCrop aspect ratio range [min, max].")
    hflip: float = _f(0.5, "Probability of a horizontal flip in training (0 turns it off).")
    color_jitter: float = _f(0.4, "Colour jitter strength in training (0 turns it off).")

    def validate(self, p: str) -> None:
        _check(0.0 < self.split_ratio < 1.0, f"{p}.split_ratio", self.split_ratio, "a number in (0, 1)")
        _check(self.num_workers >= 0, f"{p}.num_workers", self.num_workers, ">= 0")
        _check(self.max_image_pixels > 0, f"{p}.max_image_pixels", self.max_image_pixels, "> 0")
        _check(self.cache_max_gb > 0, f"{p}.cache_max_gb", self.cache_max_gb,
               "a size in GB > 0 (`raytimm cache prune --all` empties the cache)")
        for key in ("rrc_scale", "rrc_ratio"):
            v = getattr(self, key)
            _check(len(v) == 2 and 0 < v[0] <= v[1], f"{p}.{key}", v, "[min, max] with 0 < min <= max")
        _check(self.rrc_scale[1] <= 1.0, f"{p}.rrc_scale", self.rrc_scale, "max <= 1.0")
        _check(0.0 <= self.hflip <= 1.0, f"{p}.hflip", self.hflip, "a probability in [0, 1]")
        _check(self.color_jitter >= 0.0, f"{p}.color_jitter", self.color_jitter, ">= 0")


@dataclass
class ModelSection:
    name: str = _f("resnet18", "timm model name, e.g. resnet50, efficientnet_b0, vit_small_patch16_224.")
    pretrained: bool = _f(False, "Start from pretrained weights (pretrained_file, $RAYTIMM_WEIGHTS_DIR, then the hub).")
    pretrained_file: Optional[str] = _f(None, "Pretrained weights file (path or s3:// / r2:// URI); the head is adapted.")
    init_checkpoint: Optional[str] = _f(None, "Fine-tune from a raytimm checkpoint, run folder or the platform's legacy .pt.")
    img_size: Optional[int] = _f(None, "Input size in pixels; default is the model's own.")
    num_classes: Optional[int] = _f(None, "Number of classes; default comes from the dataset (must match it if set).")
    drop_rate: float = _f(0.0, "Dropout before the classifier.")
    drop_path_rate: float = _f(0.0, "Stochastic depth rate.")

    def validate(self, p: str) -> None:
        _check(bool(self.name.strip()), f"{p}.name", self.name, "a timm model name")
        if self.img_size is not None:
            _check(8 <= self.img_size <= 4096, f"{p}.img_size", self.img_size, "8..4096")
        if self.num_classes is not None:
            _check(self.num_classes >= 2, f"{p}.num_classes", self.num_classes, ">= 2")
        _check(0.0 <= self.drop_rate < 1.0, f"{p}.drop_rate", self.drop_rate, "[0, 1)")
        _check(0.0 <= self.drop_path_rate < 1.0, f"{p}.drop_path_rate", self.drop_path_rate, "[0, 1)")


@dataclass
class TrainSection:
    epochs: int = _f(10, "Number of epochs.")
    batch_size: int = _f(32, "Batch size per worker.")
    eval_batch_size: Optional[int] = _f(None, "Validation batch size per worker; default 2x batch_size.")
    lr: float = _f(1e-3, "Peak learning rate.")
    weight_decay: float = _f(0.05, "Weight decay (not applied to norm and bias parameters).")
    opt: str = _f("adamw", "Optimizer name for timm.optim.create_optimizer_v2 (adamw, sgd, lamb, ...).")
    momentum: float = _f(0.9, "Momentum for SGD-style optimizers.")
    sched: str = _f("cosine", "Scheduler name for timm.scheduler.create_scheduler_v2 (cosine, step, plateau, ...).")
    warmup_epochs: int = _f(0, "Linear warmup epochs.")
    warmup_lr: float = _f(1e-5, "Learning rate at the start of warmup.")
    min_lr: float = _f(1e-6, "Floor of the schedule.")
    sched_on_updates: bool = _f(True, "Step the scheduler every optimizer update instead of every epoch.")
    label_smoothing: float = _f(0.1, "Label smoothing of the cross-entropy loss (multi-label: each target moves towards 0.5 by this much).")
    mixup: float = _f(0.0, "Mixup alpha (0 turns it off).")
    cutmix: float = _f(0.0, "CutMix alpha (0 turns it off).")
    mixup_prob: float = _f(1.0, "Probability of applying mixup or cutmix to a batch.")
    ema: bool = _f(False, "Keep an EMA of the weights; it is validated and saved instead of the raw weights.")
    ema_decay: float = _f(0.9998, "EMA decay per update.")
    grad_accum_steps: int = _f(1, "Micro-batches accumulated per optimizer step.")
    clip_grad: Optional[float] = _f(None, "Clip the gradient norm to this value.")
    compile: bool = _f(False, "Wrap the model in torch.compile.")
    amp: Literal["auto", "bf16", "fp16", "off"] = _f("auto", "Mixed precision: auto (bf16 on GPUs that support it), bf16, fp16, off.")
    channels_last: Literal["auto", "true", "false"] = _f("auto", "Channels-last memory format: auto (on GPU), true, false.")
    seed: int = _f(42, "Random seed (per-rank offsets are added).")
    patience: int = _f(0, "Stop after this many epochs without improving checkpoint.metric (0 turns it off).")
    threads: Optional[int] = _f(None, "torch intra-op threads per worker; default: the worker's CPUs.")
    pos_weight: Literal["none", "auto"] = _f("none", "Multi-label BCE positive weight: auto = negatives/positives per label in train, clipped to [0.01, 100].")
    calibrate_thresholds: bool = _f(False, "Multi-label: store each label's F1-optimal threshold on val with every checkpoint (else 0.5).")

    def validate(self, p: str) -> None:
        _check(self.epochs >= 1, f"{p}.epochs", self.epochs, ">= 1")
        _check(self.batch_size >= 1, f"{p}.batch_size", self.batch_size, ">= 1")
        if self.eval_batch_size is not None:
            _check(self.eval_batch_size >= 1, f"{p}.eval_batch_size", self.eval_batch_size, ">= 1")
        _check(self.lr > 0, f"{p}.lr", self.lr, "> 0")
        _check(self.weight_decay >= 0, f"{p}.weight_decay", self.weight_decay, ">= 0")
        _check(0 <= self.momentum < 1, f"{p}.momentum", self.momentum, "[0, 1)")
        _check(self.warmup_epochs >= 0, f"{p}.warmup_epochs", self.warmup_epochs, ">= 0")
        _check(self.warmup_lr >= 0, f"{p}.warmup_lr", self.warmup_lr, ">= 0")
        _check(self.min_lr >= 0, f"{p}.min_lr", self.min_lr, ">= 0")
        _check(0 <= self.label_smoothing < 1, f"{p}.label_smoothing", self.label_smoothing, "[0, 1)")
        _check(self.mixup >= 0, f"{p}.mixup", self.mixup, ">= 0")
        _check(self.cutmix >= 0, f"{p}.cutmix", self.cutmix, ">= 0")
        _check(0 <= self.mixup_prob <= 1, f"{p}.mixup_prob", self.mixup_prob, "[0, 1]")
        _check(0 < self.ema_decay < 1, f"{p}.ema_decay", self.ema_decay, "(0, 1)")
        _check(self.grad_accum_steps >= 1, f"{p}.grad_accum_steps", self.grad_accum_steps, ">= 1")
        if self.clip_grad is not None:
            _check(self.clip_grad > 0, f"{p}.clip_grad", self.clip_grad, "> 0")
        _check(self.patience >= 0, f"{p}.patience", self.patience, ">= 0")
        if self.threads is not None:
            _check(self.threads >= 1, f"{p}.threads", self.threads, ">= 1")


@dataclass
class ScalingSection:
    num_workers: int = _f(1, "Number of Ray Train workers (one DDP rank each).")
    use_gpu: Optional[bool] = _f(None, "Use one GPU per worker; default: auto (true when the cluster has GPUs).")
    cpus_per_worker: Optional[float] = _f(None, "CPUs reserved per worker; default 1.")
    gpus_per_worker: float = _f(1.0, "GPUs per worker when use_gpu is on.")
    resources_per_worker: dict[str, float] = _f({}, "Extra custom resources per worker, e.g. {accelerator_type:H100: 0.01}.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = _f(
        "PACK", "How workers are placed across nodes.")

    def validate(self, p: str) -> None:
        _check(self.num_workers >= 1, f"{p}.num_workers", self.num_workers, ">= 1")
        if self.cpus_per_worker is not None:
            _check(self.cpus_per_worker > 0, f"{p}.cpus_per_worker", self.cpus_per_worker, "> 0")
        _check(self.gpus_per_worker > 0, f"{p}.gpus_per_worker", self.gpus_per_worker, "> 0")


@dataclass
class StorageSection:
    path: str = _f("./runs", "Where runs and checkpoints go: a local folder, s3://bucket/prefix or r2://bucket/prefix.")
    endpoint_url: Optional[str] = _f(None, "S3 endpoint override (else AWS_ENDPOINT_URL, or R2's from R2_ACCOUNT_ID).")
    region: Optional[str] = _f(None, "Bucket region; r2:// always uses 'auto'.")


@dataclass
class CheckpointSection:
    metric: str = _f("val/top1", "Metric that ranks checkpoints and picks `best`; with data.multi_label the default val/top1 means val/mAP.")
    mode: Literal["max", "min"] = _f("max", "Whether a larger or smaller metric is better.")
    num_to_keep: int = _f(2, "Best checkpoints kept by Ray Train (the latest is always kept too).")

    def validate(self, p: str) -> None:
        _check(self.metric in METRIC_NAMES, f"{p}.metric", self.metric, f"one of {', '.join(METRIC_NAMES)}")
        _check(self.num_to_keep >= 1, f"{p}.num_to_keep", self.num_to_keep, ">= 1")


@dataclass
class MlflowSection:
    enabled: bool = _f(True, "Track the run in MLflow.")
    tracking_uri: Optional[str] = _f(None, "Tracking server URI; default $MLFLOW_TRACKING_URI, else a sqlite store next to the runs.")
    experiment: str = _f("raytimm", "MLflow experiment name.")
    timeout_s: float = _f(10.0, "Per-request timeout; a slow or dead server never stalls training longer than this.")
    retry_after_s: float = _f(60.0, "After a failed MLflow call, wait this long before trying again; what was missed is sent then.")

    def validate(self, p: str) -> None:
        _check(self.timeout_s > 0, f"{p}.timeout_s", self.timeout_s, "> 0")
        _check(self.retry_after_s >= 0, f"{p}.retry_after_s", self.retry_after_s, ">= 0")


@dataclass
class RunSection:
    name: Optional[str] = _f(None, "Run name (folder under storage.path); default <model>-<timestamp>. Same name resumes.")
    max_failures: int = _f(2, "Worker failures tolerated; training restarts from the latest checkpoint.")

    def validate(self, p: str) -> None:
        _check(self.max_failures >= -1, f"{p}.max_failures", self.max_failures, ">= -1 (-1 = unlimited)")
        if self.name is not None:
            bad = (not self.name.strip()) or "/" in self.name or "\\" in self.name or self.name in (".", "..")
            _check(not bad, f"{p}.name", self.name, "a non-empty name without path separators")


@dataclass
class TuneSection:
    name: Optional[str] = _f(None, "Sweep name (folder under storage.path); default tune-<model>-<config hash>, so the same config resumes.")
    num_samples: int = _f(4, "Samples drawn per grid point.")
    scheduler: Literal["asha", "fifo"] = _f("asha", "Trial scheduler: asha (early stopping) or fifo.")
    searcher: Literal["random", "optuna"] = _f("random", "Search algorithm: random/grid, or optuna.")
    grace_period: int = _f(1, "ASHA: epochs every trial runs before it can be stopped.")
    reduction_factor: int = _f(2, "ASHA: fraction of trials kept at each rung is 1/reduction_factor.")
    metric: str = _f("val/top1", "Metric the sweep optimises; with data.multi_label the default val/top1 means val/mAP.")
    mode: Literal["max", "min"] = _f("max", "Whether a larger or smaller metric is better.")
    max_concurrent_trials: Optional[int] = _f(None, "Trials running at once; default derived from the cluster's CPUs/GPUs.")
    search_space: dict[str, Any] = _f({}, "Dotted config key -> {choice|grid|uniform|loguniform|randint|quniform: args}.")

    def validate(self, p: str) -> None:
        if self.name is not None:
            bad = (not self.name.strip()) or "/" in self.name or "\\" in self.name or self.name in (".", "..")
            _check(not bad, f"{p}.name", self.name, "a non-empty name without path separators")
        _check(self.num_samples >= 1, f"{p}.num_samples", self.num_samples, ">= 1")
        _check(self.grace_period >= 1, f"{p}.grace_period", self.grace_period, ">= 1")
        _check(self.reduction_factor >= 2, f"{p}.reduction_factor", self.reduction_factor, ">= 2")
        _check(self.metric in METRIC_NAMES, f"{p}.metric", self.metric, f"one of {', '.join(METRIC_NAMES)}")
        if self.max_concurrent_trials is not None:
            _check(self.max_concurrent_trials >= 1, f"{p}.max_concurrent_trials", self.max_concurrent_trials, ">= 1")
        if not isinstance(self.search_space, dict):
            raise ConfigError(f"{p}.search_space must be a mapping of dotted keys to distributions")




@dataclass
class Config:
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    storage: StorageSection = field(default_factory=StorageSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    mlflow: MlflowSection = field(default_factory=MlflowSection)
    run: RunSection = field(default_factory=RunSection)
    tune: TuneSection = field(default_factory=TuneSection)
    # The serve section is Serve's own typed settings (pydantic; raytimm/serve/settings.py), so a config
    # file, `raytimm serve` flags and `serve run`/`serve deploy` args share one set of keys and defaults.
    serve: ServeSettings = field(default_factory=ServeSettings)

    def validate(self) -> "Config":
        """Check every section; raises ConfigError naming the first bad key."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            # A pydantic section (serve) was validated when it was built; BaseModel.validate is not ours.
            if dataclasses.is_dataclass(section) and hasattr(section, "validate"):
                section.validate(f.name)
        self._check_task()
        if self.checkpoint.metric.endswith("loss") and self.checkpoint.mode == "max":
            raise ConfigError(f"checkpoint.mode='max' with checkpoint.metric={self.checkpoint.metric!r}: a loss should use mode 'min'")
        return self

    def _check_task(self) -> None:
        """Keys that belong to one task (single- or multi-label) only, and the metric default per task."""
        d, t = self.data, self.train
        if d.multi_label:
            if d.format == "imagefolder":
                raise ConfigError("data.multi_label=true needs data.format=manifest or dice: class folders cannot "
                                  "hold a set of labels per image")
            if d.balance != "none":
                raise ConfigError(f"data.balance={d.balance!r} is for single-label data; with data.multi_label=true "
                                  "use train.pos_weight=auto")
            for section, key in ((self.checkpoint, "checkpoint.metric"), (self.tune, "tune.metric")):
                # The single-label default stands for "the task's default" (see the field docs).
                if section.metric == DEFAULT_METRIC[False]:
                    section.metric = DEFAULT_METRIC[True]
                elif section.metric in SINGLE_LABEL_ONLY:
                    raise ConfigError(f"{key}={section.metric!r} is a single-label metric; with data.multi_label=true "
                                      f"use one of {', '.join(m for m in METRIC_NAMES if m not in SINGLE_LABEL_ONLY)}")
            return
        if t.pos_weight != "none":
            raise ConfigError(f"train.pos_weight={t.pos_weight!r} needs data.multi_label=true; single-label data "
                              "uses data.balance")
        if t.calibrate_thresholds:
            raise ConfigError("train.calibrate_thresholds=true needs data.multi_label=true (single-label predicts the top class)")
        if d.balance == "loss" and (t.mixup > 0 or t.cutmix > 0):
            raise ConfigError("data.balance='loss' cannot be combined with train.mixup/train.cutmix (mixed soft "
                              "targets have no class weight); use data.balance=sampler")
        for section, key in ((self.checkpoint, "checkpoint.metric"), (self.tune, "tune.metric")):
            if section.metric in MULTI_LABEL_ONLY:
                raise ConfigError(f"{key}={section.metric!r} is a multi-label metric: set data.multi_label=true, "
                                  f"or use one of {', '.join(m for m in METRIC_NAMES if m not in MULTI_LABEL_ONLY)}")


# ---------------------------------------------------------------- type coercion

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(inner)}"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "a boolean", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming key, value and type."""
    def bad() -> ConfigError:
        return ConfigError(f"{key}={value!r} has the wrong type: expected {_type_name(tp)}")

    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise bad()
    if origin is Literal:
        choices = typing.get_args(tp)
        # YAML 1.1 reads true/false/on/off/yes/no as booleans; map them back for string literals
        # such as train.amp: off or train.channels_last: true.
        if isinstance(value, bool):
            for word in (("true", "on", "yes") if value else ("false", "off", "no")):
                if word in choices:
                    return word
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}={value!r} is not allowed: expected {_type_name(tp)}{hint}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad()
        (inner,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            return float(value)
        # YAML 1.1 reads "1e-3" (no dot) as a string; accept numeric strings for floats.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad()
    return value


def _closest(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not close:
        # Also try the last segment alone, so `train.learning_rate` finds `train.lr` style typos.
        last = key.rsplit(".", 1)[-1]
        close = [c for c in candidates if c.rsplit(".", 1)[-1] == last][:1]
    return f" (did you mean {close[0]!r}?)" if close else ""


def _section_docs(section: Any) -> dict[str, str]:
    """Field name -> one-line doc of a section class (a dataclass, or a pydantic model such as ServeSettings)."""
    if dataclasses.is_dataclass(section):
        return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(section)}
    return section_docs(section)


def _section_types() -> dict[str, type]:
    return {sec.name: sec.default_factory for sec in dataclasses.fields(Config)}  # type: ignore[misc]


def valid_keys() -> list[str]:
    """All dotted keys (``section.field``) a config accepts."""
    return list(field_docs())


def field_docs() -> dict[str, str]:
    """Dotted key -> one-line doc, for --help and the README."""
    return {f"{sec}.{name}": doc for sec, cls in _section_types().items() for name, doc in _section_docs(cls).items()}


def config_from_dict(d: dict | None, *, source: str = "config") -> Config:
    """Build and validate a Config from a nested dict; unknown keys are errors."""
    d = d or {}
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(d).__name__}")
    cfg = Config()
    sections = {f.name for f in dataclasses.fields(Config)}
    for sec_name, sec_val in d.items():
        if sec_name not in sections:
            raise ConfigError(f"{source}: unknown section {sec_name!r}{_closest(str(sec_name), sorted(sections))}")
        if sec_val is None:
            continue
        if not isinstance(sec_val, dict):
            raise ConfigError(f"{source}: section {sec_name!r} must be a mapping, got {sec_val!r}")
        section_type = _section_types()[sec_name]
        if not dataclasses.is_dataclass(section_type):
            setattr(cfg, sec_name, validate_section(sec_val, section_type, sec_name, source=source))
            continue
        for k, v in sec_val.items():
            _set(cfg, f"{sec_name}.{k}", v, source=source)
    return cfg.validate()


def _set(cfg: Config, key: str, value: Any, *, source: str) -> None:
    parts = key.split(".")
    keys = valid_keys()
    if len(parts) != 2 or key not in keys:
        raise ConfigError(f"{source}: unknown key {key!r}{_closest(key, keys)}")
    section = getattr(cfg, parts[0])
    tp = typing.get_type_hints(type(section))[parts[1]]
    setattr(section, parts[1], _coerce(value, tp, key))


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``key=value``; the value is parsed as YAML (so 3 -> int, [1,2] -> list, null -> None)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value, e.g. train.epochs=3")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Apply dotted ``key=value`` overrides to a copy of cfg and validate it."""
    d = config_to_dict(cfg)
    for item in overrides:
        key, value = parse_override(item)
        sec, _, name = key.partition(".")
        if not name:
            raise ConfigError(f"override {item!r}: unknown key {key!r}{_closest(key, valid_keys())}")
        d.setdefault(sec, {})[name] = value
    return config_from_dict(d, source="override")


def set_dotted(cfg: Config, key: str, value: Any) -> Config:
    """Return a validated copy of cfg with one dotted key set (used by Tune trials)."""
    d = config_to_dict(cfg)
    sec, _, name = key.partition(".")
    if sec not in d or not name:
        raise ConfigError(f"unknown key {key!r}{_closest(key, valid_keys())}")
    d[sec][name] = value
    return config_from_dict(d, source=f"key {key}")


def _read_text(path: str, what: str) -> str:
    """A config or request file's text: a local path, or an s3:// / r2:// URI (how the training API's jobs
    read theirs); ConfigError naming it when it is missing or not UTF-8."""
    from raytimm import storage  # stdlib-only at import; boto3 loads on first remote use

    try:
        if storage.is_remote(path):
            if not storage.exists(path):
                raise ConfigError(f"{what} {path!r} does not exist")
            return storage.read_bytes(path).decode("utf-8")
        if not Path(path).is_file():
            raise ConfigError(f"{what} {path!r} does not exist")
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path!r} is not UTF-8 text") from None


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or defaults when path is None) and apply overrides."""
    d: dict = {}
    if path is not None:
        p = str(path)
        try:
            d = yaml.safe_load(_read_text(p, "config file")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config file {p!r}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
        cfg = config_from_dict(d, source=p)
    else:
        cfg = Config()
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """Nested plain dict (JSON/YAML-able); environment-only values (the API token) are left out."""
    out = {}
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        out[f.name] = dataclasses.asdict(section) if dataclasses.is_dataclass(section) else section.model_dump(mode="json")
    return json.loads(json.dumps(out))


def flatten_config(cfg: Config) -> dict[str, Any]:
    """``{"train.lr": 0.001, ...}``."""
    out = {}
    for sec, vals in config_to_dict(cfg).items():
        for k, v in vals.items():
            out[f"{sec}.{k}"] = v
    return out


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML text (logged as an MLflow artifact)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------- platform request

REQUEST_FIELDS = {
    "training_job_id", "project_id", "framework", "model_name", "num_classes", "dataset_path",
    "dataset_format", "epochs", "batch_size", "learning_rate", "checkpoint_path", "img_size",
}
_REQUIRED = ("training_job_id", "project_id", "model_name", "dataset_path")


def request_to_config(req: dict, *, source: str = "request", base: Config | None = None) -> Config:
    """Map the platform's TrainingRequest JSON onto a Config."""
    if not isinstance(req, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    unknown = sorted(set(req) - REQUEST_FIELDS)
    if unknown:
        k = unknown[0]
        raise ConfigError(f"{source}: unknown field {k!r}{_closest(k, sorted(REQUEST_FIELDS))}")
    for k in _REQUIRED:
        if req.get(k) in (None, ""):
            raise ConfigError(f"{source}: missing required field {k!r}")
    framework = req.get("framework", "timm")
    if framework != "timm":
        raise ConfigError(f"{source}: framework={framework!r} is not supported: raytimm trains 'timm' models only")
    fmt = str(req.get("dataset_format") or "imagefolder").lower()
    if fmt not in ("imagefolder", "dice"):
        raise ConfigError(f"{source}: dataset_format={fmt!r} is not allowed: expected 'imagefolder' or 'dice'")
    d = config_to_dict(base or Config())
    d["run"]["name"] = f"job_{req['training_job_id']}"
    d["mlflow"]["experiment"] = f"project_{req['project_id']}"
    d["model"]["name"] = req["model_name"]
    d["data"]["path"] = req["dataset_path"]
    d["data"]["format"] = fmt
    mapping = {
        "num_classes": ("model", "num_classes"),
        "img_size": ("model", "img_size"),
        "epochs": ("train", "epochs"),
        "batch_size": ("train", "batch_size"),
        "learning_rate": ("train", "lr"),
        "checkpoint_path": ("model", "init_checkpoint"),
    }
    for rk, (sec, name) in mapping.items():
        if req.get(rk) is not None:
            d[sec][name] = req[rk]
    try:
        return config_from_dict(d, source=source)
    except ConfigError as e:
        # Name the request field rather than the internal key, since that is what the caller sent.
        msg = str(e)
        for rk, (sec, name) in mapping.items():
            msg = msg.replace(f"{sec}.{name}=", f"{rk}=")
        raise ConfigError(msg) from None


def load_training_request(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
                          base_config: str | None = None) -> Config:
    """Load the platform's TrainingRequest JSON file as a Config."""
    p = str(path)
    try:
        req = json.loads(_read_text(p, "request file"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"request file {p!r}: invalid JSON ({e})") from None
    base = load_config(base_config) if base_config else None
    cfg = request_to_config(req, source=p, base=base)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg

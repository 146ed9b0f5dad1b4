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


def _f(default: Any, doc: str, **kw: Any) -> Any:
    """A dataclass field with a doc string; mutable defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata={"doc": doc}, **kw)
    return field(default=default, metadata={"doc": doc}, **kw)


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is out of range: expected {expected}")


@dataclass
class DataConfig:
    path: str = _f("", "Dataset root: an ImageFolder (train/ and optional val/) or a DICE export; local, s3:// or r2://.")
    format: Literal["imagefolder", "dice"] = _f("imagefolder", "Dataset layout: imagefolder or dice (converted to a cached ImageFolder).")
    split_ratio: float = _f(0.8, "Train fraction when the dataset has no val/ folder (stratified, deterministic split).")
    split_seed: int = _f(42, "Seed of the train/val split when there is no val/ folder.")
    num_workers: int = _f(2, "DataLoader worker processes per training worker.")
    cache_dir: str = _f("~/.cache/raytimm", "Node-local cache for staged datasets, DICE conversions and weights.")
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
        for key in ("rrc_scale", "rrc_ratio"):
            v = getattr(self, key)
            _check(len(v) == 2 and 0 < v[0] <= v[1], f"{p}.{key}", v, "[min, max] with 0 < min <= max")
        _check(self.rrc_scale[1] <= 1.0, f"{p}.rrc_scale", self.rrc_scale, "max <= 1.0")
        _check(0.0 <= self.hflip <= 1.0, f"{p}.hflip", self.hflip, "a probability in [0, 1]")
        _check(self.color_jitter >= 0.0, f"{p}.color_jitter", self.color_jitter, ">= 0")


@dataclass
class ModelConfig:
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
class TrainConfig:
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
    label_smoothing: float = _f(0.1, "Label smoothing of the cross-entropy loss.")
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
class ScalingConfig:
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
class StorageConfig:
    path: str = _f("./runs", "Where runs and checkpoints go: a local folder, s3://bucket/prefix or r2://bucket/prefix.")
    endpoint_url: Optional[str] = _f(None, "S3 endpoint override (else AWS_ENDPOINT_URL, or R2's from R2_ACCOUNT_ID).")
    region: Optional[str] = _f(None, "Bucket region; r2:// always uses 'auto'.")


@dataclass
class CheckpointConfig:
    metric: str = _f("val/top1", "Metric that ranks checkpoints and picks `best`.")
    mode: Literal["max", "min"] = _f("max", "Whether a larger or smaller metric is better.")
    num_to_keep: int = _f(2, "Best checkpoints kept by Ray Train (the latest is always kept too).")

    def validate(self, p: str) -> None:
        _check(self.metric in METRIC_NAMES, f"{p}.metric", self.metric, f"one of {', '.join(METRIC_NAMES)}")
        _check(self.num_to_keep >= 1, f"{p}.num_to_keep", self.num_to_keep, ">= 1")


@dataclass
class MlflowConfig:
    enabled: bool = _f(True, "Track the run in MLflow.")
    tracking_uri: Optional[str] = _f(None, "Tracking server URI; default $MLFLOW_TRACKING_URI, else a sqlite store next to the runs.")
    experiment: str = _f("raytimm", "MLflow experiment name.")
    timeout_s: float = _f(10.0, "Per-request timeout; a slow or dead server never stalls training longer than this.")
    retry_after_s: float = _f(60.0, "After a failed MLflow call, wait this long before trying again; what was missed is sent then.")

    def validate(self, p: str) -> None:
        _check(self.timeout_s > 0, f"{p}.timeout_s", self.timeout_s, "> 0")
        _check(self.retry_after_s >= 0, f"{p}.retry_after_s", self.retry_after_s, ">= 0")


@dataclass
class RunConfig:
    name: Optional[str] = _f(None, "Run name (folder under storage.path); default <model>-<timestamp>. Same name resumes.")
    max_failures: int = _f(2, "Worker failures tolerated; training restarts from the latest checkpoint.")

    def validate(self, p: str) -> None:
        _check(self.max_failures >= -1, f"{p}.max_failures", self.max_failures, ">= -1 (-1 = unlimited)")
        if self.name is not None:
            bad = (not self.name.strip()) or "/" in self.name or "\\" in self.name or self.name in (".", "..")
            _check(not bad, f"{p}.name", self.name, "a non-empty name without path separators")


@dataclass
class TuneConfig:
    name: Optional[str] = _f(None, "Sweep name (folder under storage.path); default tune-<model>-<config hash>, so the same config resumes.")
    num_samples: int = _f(4, "Samples drawn per grid point.")
    scheduler: Literal["asha", "fifo"] = _f("asha", "Trial scheduler: asha (early stopping) or fifo.")
    searcher: Literal["random", "optuna"] = _f("random", "Search algorithm: random/grid, or optuna.")
    grace_period: int = _f(1, "ASHA: epochs every trial runs before it can be stopped.")
    reduction_factor: int = _f(2, "ASHA: fraction of trials kept at each rung is 1/reduction_factor.")
    metric: str = _f("val/top1", "Metric the sweep optimises.")
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
class ServeConfig:
    host: str = _f("127.0.0.1", "Address the HTTP proxy binds; 0.0.0.0 exposes it to the network.")
    port: int = _f(8000, "HTTP port.")
    replicas: int = _f(1, "Model replicas.")
    max_batch_size: int = _f(16, "Largest batch a replica runs at once.")
    batch_wait_ms: float = _f(10.0, "How long a replica waits to fill a batch.")
    max_upload_mb: float = _f(20.0, "Largest request body in MiB (413 above).")
    max_pixels: int = _f(40_000_000, "Largest image in pixels (413 above).")
    allow: list[str] = _f([], "Storage prefixes that /inference/quick may load checkpoints from.")
    max_models: int = _f(4, "Checkpoints cached per replica for /inference/quick (LRU).")
    num_cpus: float = _f(1.0, "CPUs per replica.")
    num_gpus: float = _f(0.0, "GPUs per replica (a fraction shares a GPU).")

    def validate(self, p: str) -> None:
        _check(1 <= self.port <= 65535, f"{p}.port", self.port, "1..65535")
        _check(self.replicas >= 1, f"{p}.replicas", self.replicas, ">= 1")
        _check(self.max_batch_size >= 1, f"{p}.max_batch_size", self.max_batch_size, ">= 1")
        _check(self.batch_wait_ms >= 0, f"{p}.batch_wait_ms", self.batch_wait_ms, ">= 0")
        _check(self.max_upload_mb > 0, f"{p}.max_upload_mb", self.max_upload_mb, "> 0")
        _check(self.max_pixels > 0, f"{p}.max_pixels", self.max_pixels, "> 0")
        _check(self.max_models >= 1, f"{p}.max_models", self.max_models, ">= 1")
        _check(self.num_cpus >= 0, f"{p}.num_cpus", self.num_cpus, ">= 0")
        _check(self.num_gpus >= 0, f"{p}.num_gpus", self.num_gpus, ">= 0")


METRIC_NAMES = ("val/top1", "val/top5", "val/loss", "train/loss", "train/top1")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def validate(self) -> "Config":
        """Check every section; raises ConfigError naming the first bad key."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate(f.name)
        if self.checkpoint.metric.endswith("loss") and self.checkpoint.mode == "max":
            raise ConfigError(f"checkpoint.mode='max' with checkpoint.metric={self.checkpoint.metric!r}: a loss should use mode 'min'")
        return self


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


def valid_keys() -> list[str]:
    """All dotted keys (``section.field``) a config accepts."""
    out = []
    for sec in dataclasses.fields(Config):
        for f in dataclasses.fields(sec.default_factory()):  # type: ignore[misc]
            out.append(f"{sec.name}.{f.name}")
    return out


def field_docs() -> dict[str, str]:
    """Dotted key -> one-line doc, for --help and the README."""
    out = {}
    for sec in dataclasses.fields(Config):
        for f in dataclasses.fields(sec.default_factory()):  # type: ignore[misc]
            out[f"{sec.name}.{f.name}"] = f.metadata.get("doc", "")
    return out


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


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or defaults when path is None) and apply overrides."""
    d: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            d = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config file {str(p)!r}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {str(p)!r} is not UTF-8 text") from None
        cfg = config_from_dict(d, source=str(p))
    else:
        cfg = Config()
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """Nested plain dict (JSON/YAML-able)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


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
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"request file {str(p)!r} does not exist")
    try:
        req = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"request file {str(p)!r}: invalid JSON ({e})") from None
    base = load_config(base_config) if base_config else None
    cfg = request_to_config(req, source=str(p), base=base)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg

"""Sweep definitions: ``tune.search_space`` parsed and checked against the config, trial configs,
the sweep's name and how many trials fit the cluster.

Imports neither Ray nor torch (``to_param_space`` imports Ray's domains when called), so the CLI
checks a sweep's config in milliseconds and the tests run without a cluster.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
from typing import Any, Mapping, Sequence

from raytimm.config import Config, config_to_dict, set_dotted, valid_keys
from raytimm.errors import ConfigError, RaytimmError

KINDS = ("choice", "grid", "uniform", "loguniform", "randint", "quniform")
# What each distribution's argument list looks like, for error messages.
KIND_SHAPES = {
    "choice": "a non-empty list of values",
    "grid": "a non-empty list of values",
    "uniform": "[low, high] with low < high",
    "loguniform": "[low, high] with 0 < low < high",
    "randint": "[low, high] integers with low < high (high excluded, as in Ray and numpy)",
    "quniform": "[low, high, q] with low < high and q > 0",
}
# Keys that decide where a sweep and its trials live: sweeping them would scatter or merge trials.
UNSWEEPABLE = ("storage.path", "run.name", "mlflow.tracking_uri", "mlflow.experiment", "mlflow.enabled")
TRIAL_PREFIX = "trial_"


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One swept config key: ``key`` (dotted), ``kind`` (one of KINDS) and its arguments."""

    key: str
    kind: str
    args: tuple

    def describe(self) -> str:
        return f"{self.key}: {self.kind} {list(self.args)}"


def _where(key: str) -> str:
    return f"tune.search_space.{key}"


def _is_number(v: Any) -> bool:
    # numbers.Real also covers numpy scalars (Tune's dataframes hold np.int64 epochs).
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _probe(cfg: Config, key: str, value: Any, what: str) -> None:
    """Check that ``key=value`` is a valid config (type and range); the error names the key."""
    try:
        set_dotted(cfg, key, value)
    except ConfigError as e:
        raise ConfigError(f"{_where(key)}: {what} {value!r} is not valid for {key}: {e}") from None


def _parse_one(cfg: Config, key: str, spec: Any) -> Dimension:
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ConfigError(f"{_where(key)}: expected one distribution like {{choice: [a, b]}} or "
                          f"{{loguniform: [1.0e-4, 1.0e-2]}} (one of {', '.join(KINDS)}), got {spec!r}")
    (kind, args), = spec.items()
    if kind not in KINDS:
        import difflib

        close = difflib.get_close_matches(str(kind), KINDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{_where(key)}: unknown distribution {kind!r}{hint}; use one of {', '.join(KINDS)}")

    def bad() -> ConfigError:
        return ConfigError(f"{_where(key)}: {kind} needs {KIND_SHAPES[kind]}, got {args!r}")

    if not isinstance(args, (list, tuple)):
        raise bad()
    args = tuple(args)
    if kind in ("choice", "grid"):
        if not args:
            raise bad()
        for v in args:
            _probe(cfg, key, v, f"{kind} value")
        return Dimension(key, kind, args)
    if kind == "quniform":
        if len(args) != 3 or not all(_is_number(a) for a in args) or not args[0] < args[1] or args[2] <= 0:
            raise bad()
    elif kind == "randint":
        ints = all(_is_number(a) and float(a).is_integer() for a in args)
        if len(args) != 2 or not ints or not args[0] < args[1]:
            raise bad()
        args = (int(args[0]), int(args[1]))
    else:
        if len(args) != 2 or not all(_is_number(a) for a in args) or not args[0] < args[1]:
            raise bad()
        if kind == "loguniform" and args[0] <= 0:
            raise bad()
    low, high = args[0], args[1]
    _probe(cfg, key, low, f"{kind} low end")
    _probe(cfg, key, high - 1 if kind == "randint" else high, f"{kind} high end")
    if kind in ("uniform", "loguniform"):
        # A draw is fractional: an integer key (train.batch_size) would fail only inside a trial.
        mid = low + (high - low) * 0.4142
        try:
            set_dotted(cfg, key, mid)
        except ConfigError:
            raise ConfigError(f"{_where(key)}: {kind} draws fractional values but {key} takes integers; "
                              f"use randint or quniform with an integer q") from None
    if kind == "quniform" and not float(args[2]).is_integer():
        try:
            set_dotted(cfg, key, low + args[2] * 0.5)
        except ConfigError:
            raise ConfigError(f"{_where(key)}: quniform with q={args[2]!r} draws fractional values but "
                              f"{key} takes integers; use an integer q") from None
    return Dimension(key, kind, args)


def parse_search_space(space: Mapping[str, Any], cfg: Config) -> list[Dimension]:
    """Validate ``tune.search_space`` against cfg: known keys, well-formed distributions, valid values."""
    if not isinstance(space, Mapping):
        raise ConfigError("tune.search_space must be a mapping of dotted config keys to distributions")
    keys = valid_keys()
    dims = []
    for key, spec in space.items():
        key = str(key)
        if key not in keys:
            import difflib

            close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{_where(key)}: unknown config key {key!r}{hint}")
        if key.startswith("tune.") or key in UNSWEEPABLE:
            raise ConfigError(f"{_where(key)}: {key} cannot be swept: it decides where and how the sweep itself runs")
        dims.append(_parse_one(cfg, key, spec))
    return dims


def check_searcher(dims: Sequence[Dimension], searcher: str) -> None:
    """Optuna samples its own points: a grid cannot be honoured there, so say which key has one."""
    if searcher == "optuna":
        grids = [d.key for d in dims if d.kind == "grid"]
        if grids:
            raise ConfigError(f"{_where(grids[0])}: grid is not supported with tune.searcher=optuna; "
                              f"use choice (Optuna samples it) or tune.searcher=random")


def grid_size(dims: Sequence[Dimension]) -> int:
    """Number of grid points (1 without grids); total trials = grid_size * num_samples."""
    n = 1
    for d in dims:
        if d.kind == "grid":
            n *= len(d.args)
    return n


def apply_trial_config(cfg: Config, values: Mapping[str, Any]) -> Config:
    """cfg with every swept ``dotted.key: value`` set (validated)."""
    for key, value in values.items():
        try:
            cfg = set_dotted(cfg, key, value)
        except ConfigError as e:
            raise ConfigError(f"{_where(key)}: trial value {value!r}: {e}") from None
    return cfg


def default_tune_name(cfg: Config) -> str:
    """``tune-<model>-<hash of the config>``: the same command names the same sweep, so it resumes."""
    d = config_to_dict(cfg)
    d["tune"].pop("name", None)
    digest = hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]
    return f"tune-{cfg.model.name.replace('/', '_')}-{digest}"


def trial_resources(cfg: Config, use_gpu: bool) -> dict[str, float]:
    """CPUs/GPUs one trial's Train workers reserve (its driver reserves none)."""
    cpus = cfg.scaling.num_workers * (cfg.scaling.cpus_per_worker or 1)
    out = {"CPU": float(cpus)}
    if use_gpu:
        out["GPU"] = float(cfg.scaling.num_workers * cfg.scaling.gpus_per_worker)
    return out


def derive_max_concurrent(per_trial: Mapping[str, float], cluster: Mapping[str, float]) -> int:
    """How many trials fit in the cluster at once; RaytimmError when not even one does."""
    fits = []
    for res, need in per_trial.items():
        if need <= 0:
            continue
        have = float(cluster.get(res, 0))
        fits.append(int(have // need + 1e-9))
    n = min(fits) if fits else 1
    if n < 1:
        need = ", ".join(f"{k}={v:g}" for k, v in per_trial.items())
        have = ", ".join(f"{k}={float(cluster.get(k, 0)):g}" for k in per_trial)
        raise RaytimmError(f"one trial needs {need} (scaling.num_workers x per-worker resources) but the "
                           f"cluster has {have}; lower scaling.num_workers or scaling.cpus_per_worker")
    return n


def _to_domain(d: Dimension):
    from ray import tune as rtune

    a = d.args
    if d.kind == "grid":
        return rtune.grid_search(list(a))
    if d.kind == "choice":
        return rtune.choice(list(a))
    if d.kind == "uniform":
        return rtune.uniform(a[0], a[1])
    if d.kind == "loguniform":
        return rtune.loguniform(a[0], a[1])
    if d.kind == "randint":
        return rtune.randint(a[0], a[1])
    return rtune.quniform(a[0], a[1], a[2])


def to_param_space(dims: Sequence[Dimension]) -> dict:
    """Tune's param_space: flat dotted keys (Tune splits nested keys on "/", never on ".")."""
    return {d.key: _to_domain(d) for d in dims}

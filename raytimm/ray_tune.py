"""Hyperparameter sweeps: a Ray Tune ``Tuner`` over a driver that runs one Ray Train job per trial.

The Ray Train V2 pattern: Tune schedules *driver functions* (no CPUs of their own); each driver
builds one ``TorchTrainer`` through ``ray_train.train`` with ``TuneReportCallback`` so per-epoch
metrics reach Tune and ASHA can stop a trial early. Every trial is a normal raytimm run folder
``<storage.path>/<tune name>/trial_<trial id>/`` with its own ``best``/``latest`` pointers; the
tune folder gets a ``best`` pointer to the best trial's best checkpoint and a ``trials.csv``.

The search-space half of this module (``parse_search_space`` and friends) imports neither Ray
nor torch, so configs are checked in milliseconds and unit-tested without a cluster.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import numbers
import os
from typing import Any, Mapping, Optional, Sequence

from raytimm.config import Config, config_from_dict, config_to_dict, set_dotted, valid_keys
from raytimm.errors import ConfigError, RaytimmError

log = logging.getLogger("raytimm.tune")

# ------------------------------------------------------------------ search space (no Ray)

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
# What engine reports each epoch (DESIGN.md "Metrics").
METRIC_KEYS = ("train/loss", "train/top1", "val/loss", "val/top1", "val/top5", "lr", "throughput", "epoch")


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


# ------------------------------------------------------------------ results

@dataclasses.dataclass
class TrialSummary:
    """One trial of a sweep, as `trials.csv` and `--result-json` report it."""

    trial_id: str
    config: dict
    best_metrics: dict
    epochs: int
    status: str  # completed | stopped (early, by the scheduler) | error | pending
    checkpoint: Optional[str]
    run_dir: str = ""
    latest_checkpoint: Optional[str] = None
    error: Optional[str] = None
    # Per-epoch metrics Tune received (for MLflow backfill); not part of the JSON summary.
    history: list = dataclasses.field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "history"}


@dataclasses.dataclass
class TuneResult:
    """What `raytimm tune --result-json` writes: the best trial as for a train run, plus all trials."""

    run_dir: str
    best_checkpoint: Optional[str]
    best_metrics: dict
    best_config: dict
    best_trial_id: Optional[str]
    latest_checkpoint: Optional[str]
    mlflow_run_id: Optional[str]
    trials: list[TrialSummary]
    metric: str = "val/top1"
    mode: str = "max"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["trials"] = [t.to_dict() for t in self.trials]
        return d


def pick_best(trials: Sequence[TrialSummary], metric: str, mode: str) -> Optional[TrialSummary]:
    """The trial whose best checkpoint has the best ``metric``; trials without one are skipped."""
    ranked = [t for t in trials if t.checkpoint and _is_number(t.best_metrics.get(metric))]
    if not ranked:
        return None
    key = (lambda t: t.best_metrics[metric])
    return (max if mode == "max" else min)(ranked, key=key)


def trials_table(trials: Sequence[TrialSummary], swept: Sequence[str], metric: str) -> list[list[str]]:
    """Rows (header first) of the results table: swept values, best metric, epochs, status, checkpoint."""
    rows = [["trial_id", *swept, metric, "epochs", "status", "checkpoint"]]
    for t in trials:
        value = t.best_metrics.get(metric)
        rows.append([t.trial_id, *(_fmt(t.config.get(k)) for k in swept),
                     f"{value:.4f}" if _is_number(value) else "", str(t.epochs), t.status, t.checkpoint or ""])
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else str(v)


def format_table(rows: list[list[str]]) -> str:
    """Fixed-width text table for the terminal."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def table_csv(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


# ------------------------------------------------------------------ Ray side

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


def _absolutize(cfg: Config) -> Config:
    """cfg with local paths absolute, so trial drivers (chdir'ed by Tune) find them.

    The data/storage/model paths go through ``ray_train.absolutize_paths`` (which keeps a
    ``~``/``$VAR`` cache_dir for each node to expand); a relative sqlite tracking store is added here.
    """
    from raytimm.ray_train import absolutize_paths

    cfg = absolutize_paths(cfg)
    tracking = cfg.mlflow.tracking_uri
    if tracking and tracking.startswith("sqlite:///") and not tracking.startswith("sqlite:////"):
        tracking = "sqlite:///" + os.path.abspath(tracking[len("sqlite:///"):])
        cfg = dataclasses.replace(cfg, mlflow=dataclasses.replace(cfg.mlflow, tracking_uri=tracking))
    return cfg


def _trial_driver(config: dict, *, base: dict, tune_dir: str, tracking_uri: Optional[str],
                  parent_run_id: Optional[str]) -> None:
    """One Tune trial: the swept values on top of the base config, trained by one TorchTrainer."""
    from ray import tune as rtune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raytimm.ray_train import train

    trial_id = rtune.get_context().get_trial_id()
    cfg = apply_trial_config(config_from_dict(base), config)
    cfg = dataclasses.replace(
        cfg,
        storage=dataclasses.replace(cfg.storage, path=tune_dir),
        # The run name is the trial id: a restored trial finds its own folder and MLflow run again.
        run=dataclasses.replace(cfg.run, name=f"{TRIAL_PREFIX}{trial_id}"),
        mlflow=dataclasses.replace(cfg.mlflow, tracking_uri=tracking_uri),
    )
    train(cfg, mlflow_parent_run_id=parent_run_id, callbacks=[TuneReportCallback()], check=False)


def _scheduler(cfg: Config):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    t = cfg.tune
    if t.scheduler == "fifo":
        return FIFOScheduler()
    epochs = cfg.train.epochs
    # "epoch" rather than training_iteration: a restored trial resumes at its checkpoint's epoch
    # while Tune's iteration counter starts again from 1.
    return ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=min(t.grace_period, epochs),
                         reduction_factor=t.reduction_factor)


def _searcher(cfg: Config):
    if cfg.tune.searcher != "optuna":
        return None  # Tune's BasicVariantGenerator: grid points x num_samples random draws
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as e:  # pragma: no cover - optuna is an optional extra
        raise RaytimmError(f"tune.searcher=optuna needs optuna installed (pip install 'raytimm[optuna]'): {e}")
    return OptunaSearch(seed=cfg.train.seed)


def _tune_config(cfg: Config, max_concurrent: int):
    from ray.tune import TuneConfig

    return TuneConfig(metric=cfg.tune.metric, mode=cfg.tune.mode, scheduler=_scheduler(cfg),
                      search_alg=_searcher(cfg), num_samples=cfg.tune.num_samples,
                      max_concurrent_trials=max_concurrent,
                      trial_dirname_creator=lambda trial: f"tune_{trial.trial_id}")


def _use_gpu(cfg: Config, cluster: Mapping[str, float]) -> bool:
    return cfg.scaling.use_gpu if cfg.scaling.use_gpu is not None else cluster.get("GPU", 0) > 0


def _open_parent_run(cfg: Config, tune_name: str, tune_dir: str, tracking_uri: str, dims: Sequence[Dimension]):
    """The sweep's MLflow parent run; the same sweep name continues the same run."""
    from raytimm.config import dump_yaml, flatten_config
    from raytimm.tracking import find_run, make_logger, scrub_secrets

    if not cfg.mlflow.enabled:
        return None
    run_id = find_run(tracking_uri, cfg.mlflow.experiment, tune_name, timeout_s=cfg.mlflow.timeout_s)
    logger = make_logger(enabled=True, tracking_uri=tracking_uri, experiment=cfg.mlflow.experiment,
                         run_name=tune_name, run_id=run_id, timeout_s=cfg.mlflow.timeout_s,
                         tags={"raytimm.kind": "tune", "raytimm.run_dir": tune_dir})
    if not logger.run_id:
        return None
    swept = {d.key for d in dims}
    params = {k: v for k, v in scrub_secrets(flatten_config(cfg)).items() if k not in swept}
    params.update({f"search.{d.key}": f"{d.kind} {list(d.args)}" for d in dims})
    logger.log_params(params)
    logger.log_text(dump_yaml(cfg), "config.yaml")
    return logger


def tune(cfg: Config) -> TuneResult:
    """Run (or resume) the sweep in cfg.tune and publish the best trial's best checkpoint."""
    from raytimm import storage
    from raytimm.ray_train import init_ray, preflight
    from raytimm.tracking import default_tracking_uri

    dims = parse_search_space(cfg.tune.search_space, cfg)
    check_searcher(dims, cfg.tune.searcher)
    cfg = _absolutize(cfg)
    # Trials rank their own checkpoints by the sweep's metric, so a trial's `best` is what Tune ranks.
    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, metric=cfg.tune.metric,
                                                                  mode=cfg.tune.mode))
    tune_name = cfg.tune.name or default_tune_name(cfg)
    tune_dir = storage.join(cfg.storage.path, tune_name)
    storage.configure(endpoint_url=cfg.storage.endpoint_url, region=cfg.storage.region)
    preflight(cfg)  # once for the sweep; trial drivers skip it
    tracking_uri = None
    if cfg.mlflow.enabled:
        tracking_uri = cfg.mlflow.tracking_uri or default_tracking_uri(cfg.storage.path)

    # The State API behind the dashboard releases early-stopped trials' placement groups
    # (PITFALLS: without it their CPUs leak and later trials time out).
    init_ray(include_dashboard=None if os.environ.get("RAY_ADDRESS") else True)
    import ray

    cluster = ray.cluster_resources()
    per_trial = trial_resources(cfg, _use_gpu(cfg, cluster))
    fit = derive_max_concurrent(per_trial, cluster)
    max_concurrent = cfg.tune.max_concurrent_trials or fit
    if max_concurrent > fit:
        log.warning("tune.max_concurrent_trials=%d but only %d trial(s) needing %s fit the cluster; "
                    "the rest wait for resources", max_concurrent, fit, per_trial)

    parent = _open_parent_run(cfg, tune_name, tune_dir, tracking_uri, dims) if tracking_uri else None
    tuner = _make_tuner(cfg, dims, tune_name, tune_dir, tracking_uri, parent.run_id if parent else None,
                        max_concurrent)
    total = grid_size(dims) * cfg.tune.num_samples
    print(f"sweep {tune_name}: {total} trial(s), {cfg.tune.scheduler} scheduler, {cfg.tune.searcher} search, "
          f"up to {max_concurrent} at once ({', '.join(f'{k}={v:g}' for k, v in per_trial.items())} each); "
          f"folder {tune_dir}")
    try:
        grid = tuner.fit()
    except Exception as e:  # Tune wraps driver errors; keep the cause, name the sweep
        if parent is not None:
            parent.finish("FAILED")
        raise RaytimmError(f"sweep {tune_name!r} failed: {type(e).__name__}: {e}") from None

    result = summarize(grid, cfg, dims, tune_dir, parent.run_id if parent else None)
    _publish(result, cfg, dims, tune_dir)
    if parent is not None:
        _finish_mlflow(parent, result, cfg, dims, tracking_uri)
    failed = [t for t in result.trials if t.status == "error"]
    if result.best_checkpoint is None:
        why = f"; first error: {failed[0].error}" if failed else ""
        raise RaytimmError(f"sweep {tune_name!r} produced no checkpoint ({len(failed)} trial(s) failed){why}")
    if failed:
        log.warning("%d of %d trial(s) failed, e.g. %s: %s", len(failed), len(result.trials), failed[0].trial_id,
                    failed[0].error)
    return result


def _make_tuner(cfg: Config, dims: Sequence[Dimension], tune_name: str, tune_dir: str,
                tracking_uri: Optional[str], parent_run_id: Optional[str], max_concurrent: int):
    """A new Tuner, or the interrupted one restored when this sweep's folder already holds one."""
    from ray import tune as rtune

    from raytimm import storage

    fs, fs_path = storage.get_filesystem(cfg.storage.path)
    trainable = rtune.with_parameters(_trial_driver, base=config_to_dict(cfg), tune_dir=tune_dir,
                                      tracking_uri=tracking_uri, parent_run_id=parent_run_id)
    # The driver only waits on its TorchTrainer; a zero-CPU request must name some resource
    # (PITFALLS: {"cpu": 0} alone raises), so it asks for one byte of memory.
    trainable = rtune.with_resources(trainable, {"cpu": 0, "memory": 1})
    exp_path = f"{fs_path.rstrip('/')}/{tune_name}"
    if rtune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        print(f"resuming sweep {tune_name} from {tune_dir} (finished trials are kept; "
              f"set tune.name to start a new sweep)")
        return rtune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True, storage_filesystem=fs)
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    # raytimm.logs turns Tune's automatic loggers off (noise for `train`); a sweep wants them:
    # result.json/progress.csv per trial are what Tune's ResultGrid and restore read back.
    run_config = rtune.RunConfig(name=tune_name, storage_path=fs_path, storage_filesystem=fs, verbose=0,
                                 failure_config=rtune.FailureConfig(max_failures=0),
                                 callbacks=[JsonLoggerCallback(), CSVLoggerCallback()])
    return rtune.Tuner(trainable, param_space=to_param_space(dims),
                       tune_config=_tune_config(cfg, max_concurrent), run_config=run_config)


def _trial_id(result) -> str:
    tid = (result.metrics or {}).get("trial_id")
    if tid:
        return str(tid)
    base = os.path.basename(str(result.path).rstrip("/"))
    return base[len("tune_"):] if base.startswith("tune_") else base


def trial_checkpoints(run_dir: str) -> list[tuple[str, dict]]:
    """(URI, metrics) of every complete checkpoint in a trial's run folder, oldest first.

    The folder is the truth: ASHA kills a trial's driver between epochs, so the trial's own
    `best` pointer can lag (or name a checkpoint Ray's num_to_keep has since deleted), and a
    stopped trial may have finished one more epoch than Tune saw.
    """
    from raytimm import storage
    from raytimm.checkpoint import META_FILE, MODEL_FILE, load_meta

    files: dict[str, set] = {}
    for f in storage.list_files(run_dir):
        parts = f.key.split("/")
        if len(parts) == 2 and parts[0].startswith("checkpoint_"):
            files.setdefault(parts[0], set()).add(parts[1])
    out = []
    for name in sorted(files):
        if not {META_FILE, MODEL_FILE} <= files[name]:
            continue  # still being written, or torn by a kill
        uri = storage.join(run_dir, name)
        try:
            meta = load_meta(uri)
        except Exception as e:  # one unreadable checkpoint must not hide the others
            log.warning("skipping checkpoint %s: %s", uri, e)
            continue
        metrics = _numbers(meta.get("metrics") or {})
        if _is_number(meta.get("epoch")):
            metrics["epoch"] = float(meta["epoch"])
        out.append((uri, metrics))
    return out


def best_of(checkpoints: Sequence[tuple[str, dict]], metric: str, mode: str) -> Optional[tuple[str, dict]]:
    """The checkpoint with the best metric; a tie goes to the later one, as Ray's retention does."""
    ranked = [(i, c) for i, c in enumerate(checkpoints) if _is_number(c[1].get(metric))]
    if not ranked:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(ranked, key=lambda ic: (sign * ic[1][1][metric], ic[0]))[1]


def _trial_status(error: Any, epochs: int, max_epochs: int) -> str:
    if error is not None:
        return "error"
    if epochs >= max_epochs:
        return "completed"
    return "stopped" if epochs > 0 else "pending"


def summarize(grid, cfg: Config, dims: Sequence[Dimension], tune_dir: str,
              mlflow_run_id: Optional[str]) -> TuneResult:
    """TuneResult from Tune's ResultGrid plus the checkpoints each trial's run folder holds."""
    from raytimm import storage

    swept = [d.key for d in dims]
    trials = []
    for r in grid:
        tid = _trial_id(r)
        run_dir = storage.join(tune_dir, f"{TRIAL_PREFIX}{tid}")
        ckpts = trial_checkpoints(run_dir)
        seen = int((r.metrics or {}).get("epoch") or 0)
        if seen:
            # A stopped trial's workers often finish one more epoch before the kill lands; the
            # sweep reports what the scheduler saw and decided on, so skip checkpoints past it.
            ckpts = [c for c in ckpts if c[1].get("epoch", 0) <= seen]
        best = best_of(ckpts, cfg.tune.metric, cfg.tune.mode)
        # A restored trial whose training had already finished reports nothing new to Tune.
        epochs = seen or int(max([c[1].get("epoch", 0) for c in ckpts] + [0]))
        trials.append(TrialSummary(
            trial_id=tid, config={k: (r.config or {}).get(k) for k in swept},
            best_metrics=best[1] if best else {}, epochs=epochs,
            status=_trial_status(r.error, epochs, cfg.train.epochs), checkpoint=best[0] if best else None,
            run_dir=run_dir, latest_checkpoint=ckpts[-1][0] if ckpts else None, history=_history(r),
            error=(f"{type(r.error).__name__}: {r.error}".splitlines()[0][:500] if r.error is not None else None)))
    trials.sort(key=lambda t: t.trial_id)
    best = pick_best(trials, cfg.tune.metric, cfg.tune.mode)
    return TuneResult(run_dir=tune_dir, best_checkpoint=best.checkpoint if best else None,
                      best_metrics=best.best_metrics if best else {}, best_config=best.config if best else {},
                      best_trial_id=best.trial_id if best else None,
                      latest_checkpoint=best.latest_checkpoint if best else None,
                      mlflow_run_id=mlflow_run_id, trials=trials, metric=cfg.tune.metric, mode=cfg.tune.mode)


def _history(result) -> list[dict]:
    """Per-epoch metrics Tune recorded for one trial (empty when its logs are missing)."""
    df = getattr(result, "metrics_dataframe", None)
    if df is None or "epoch" not in getattr(df, "columns", ()):
        return []
    keep = [c for c in df.columns if c in METRIC_KEYS]
    return [_numbers(row) for row in df[keep].to_dict("records")]


def _numbers(m: Mapping) -> dict:
    return {str(k): float(v) for k, v in m.items() if _is_number(v)}


def _publish(result: TuneResult, cfg: Config, dims: Sequence[Dimension], tune_dir: str) -> None:
    """Print the table, write trials.csv, and point the tune folder's `best` at the best checkpoint."""
    from raytimm import storage
    from raytimm.checkpoint import write_best_pointer, write_latest_pointer

    rows = trials_table(result.trials, [d.key for d in dims], cfg.tune.metric)
    print(format_table(rows))
    storage.write_text(storage.join(tune_dir, "trials.csv"), table_csv(rows))
    for t in result.trials:
        # ASHA kills a trial's driver right after the result it stops on, often before the trial's
        # own pointer updates: rewrite them from the checkpoints so each trial folder stays servable.
        if t.checkpoint:
            write_best_pointer(t.run_dir, t.checkpoint, t.best_metrics)
        if t.latest_checkpoint:
            write_latest_pointer(t.run_dir, t.latest_checkpoint, {"epoch": t.epochs})
    if result.best_checkpoint:
        write_best_pointer(tune_dir, result.best_checkpoint, result.best_metrics)
        print(f"best trial {result.best_trial_id}: {cfg.tune.metric}={result.best_metrics.get(cfg.tune.metric)} "
              f"{json.dumps(result.best_config)}")


def _close_child(t: TrialSummary, cfg: Config, tracking_uri: str) -> None:
    """Backfill a trial's MLflow run with the epochs Tune saw and give it a final status.

    A trial's driver is killed when the scheduler stops it (ASHA also stops trials at max_t),
    so its own run may miss the last epoch and still read RUNNING.
    """
    from raytimm.tracking import find_run, make_logger

    run_id = find_run(tracking_uri, cfg.mlflow.experiment, f"{TRIAL_PREFIX}{t.trial_id}",
                      timeout_s=cfg.mlflow.timeout_s)
    if run_id is None:
        return
    child = make_logger(enabled=True, tracking_uri=tracking_uri, experiment=cfg.mlflow.experiment,
                        run_name=None, run_id=run_id, timeout_s=cfg.mlflow.timeout_s,
                        tags={"raytimm.tune_status": t.status, "raytimm.trial_id": t.trial_id,
                              "raytimm.best_checkpoint": t.checkpoint or ""})
    for row in t.history:
        if "epoch" in row:
            child.log_metrics(row, step=int(row["epoch"]))
    child.finish({"completed": "FINISHED", "error": "FAILED"}.get(t.status, "KILLED"))


def _finish_mlflow(parent, result: TuneResult, cfg: Config, dims: Sequence[Dimension], tracking_uri: str) -> None:
    """Tag the parent with the best trial, attach trials.csv, and close every trial's child run."""
    from raytimm.tracking import find_run

    best_run = None
    if result.best_trial_id:
        best_run = find_run(tracking_uri, cfg.mlflow.experiment, f"{TRIAL_PREFIX}{result.best_trial_id}",
                            timeout_s=cfg.mlflow.timeout_s)
    parent.set_tags({"raytimm.best_trial": result.best_trial_id or "", "raytimm.best_run_id": best_run or "",
                     "raytimm.best_checkpoint": result.best_checkpoint or "",
                     "raytimm.best_config": json.dumps(result.best_config)})
    if result.best_metrics:
        parent.log_metrics({f"best/{k}": v for k, v in result.best_metrics.items() if k != "epoch"},
                           step=int(result.best_metrics.get("epoch", 0)))
    parent.log_text(table_csv(trials_table(result.trials, [d.key for d in dims], cfg.tune.metric)), "trials.csv")
    for t in result.trials:
        _close_child(t, cfg, tracking_uri)
    parent.finish("FINISHED")

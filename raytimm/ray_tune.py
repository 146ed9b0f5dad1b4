"""Hyperparameter sweeps: a Ray Tune ``Tuner`` over a driver that runs one Ray Train job per trial.

The Ray Train V2 pattern: Tune schedules *driver functions* (no CPUs of their own); each driver
builds one ``TorchTrainer`` through ``ray_train.train`` with ``TuneReportCallback`` so per-epoch
metrics reach Tune and ASHA can stop a trial early. Every trial is a normal raytimm run folder
``<storage.path>/<tune name>/trial_<trial id>/`` with its own ``best``/``latest`` pointers; the
tune folder gets a ``best`` pointer to the best trial's best checkpoint and a ``trials.csv``.

The search space lives in ``tune_space.py`` (no Ray, no torch) and the results in ``tune_results.py``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Mapping, Optional, Sequence

from raytimm.config import Config, config_from_dict, config_to_dict
from raytimm.errors import RaytimmError
from raytimm.tune_results import TrialSummary, TuneResult, publish, summarize, table_csv, trials_table
from raytimm.tune_space import (TRIAL_PREFIX, Dimension, apply_trial_config, check_searcher, default_tune_name,
                                derive_max_concurrent, grid_size, parse_search_space, to_param_space,
                                trial_resources)

log = logging.getLogger("raytimm.tune")


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
    from raytimm.tracking import make_logger, scrub_secrets

    if not cfg.mlflow.enabled:
        return None
    logger = make_logger(enabled=True, tracking_uri=tracking_uri, experiment=cfg.mlflow.experiment,
                         run_name=tune_name, resume_by_name=True, timeout_s=cfg.mlflow.timeout_s,
                         cooldown_s=cfg.mlflow.retry_after_s,
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
    # (docs/pitfalls-found.md: without it their CPUs leak and later trials time out).
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

    _wait_for_trial_writers()  # before reading the trial folders: a stopped trial's controller may still write
    result = summarize(grid, cfg, dims, tune_dir, parent.run_id if parent else None)
    publish(result, cfg, dims, tune_dir)
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


# The actors that may still write a trial's folder after Tune returns: the trial's driver (Tune's
# function-trainable actor) and the TorchTrainer controller it owns (which runs TrackingCallback).
_TRIAL_WRITERS = ("ImplicitFunc", "TrainController")


def _wait_for_trial_writers(timeout_s: float = 60.0) -> list[str]:
    """Wait until this sweep's trial drivers and Ray Train controllers have exited.

    ASHA stops a trial by ending its driver; the controller the driver owns is only killed after it
    (Ray's ownership fate-sharing is asynchronous), and until then its tracking callback may still
    write the trial's progress.json and pointers for a report that was in flight. Had ``publish``
    settled the trial folders first, that late write would turn ``stopped_early`` back into
    ``running``. The actors are read from the State API that ``raytimm tune`` keeps on (the
    dashboard); where it cannot answer, the folders are settled without waiting. Returns the class
    names of the writers still alive when it gave up (empty: all exited, or nothing to ask).
    """
    import time

    import ray
    from ray.util.state import list_actors

    context = ray.get_runtime_context()
    # An explicit address: "auto" fails when this machine runs more than one Ray instance.
    address, job_id = context.gcs_address, context.get_job_id()
    filters = [("job_id", "=", job_id), ("state", "!=", "DEAD")]
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            actors = list_actors(address=address, filters=filters, timeout=10, raise_on_missing_output=False)
        except Exception as e:  # noqa: BLE001 - no State API here: settle without waiting
            log.debug("cannot list the trials' actors (%s); settling the trial folders now", e)
            return []
        alive = sorted(a.class_name for a in actors if a.class_name in _TRIAL_WRITERS)
        if not alive:
            return []
        if time.monotonic() > deadline:
            log.warning("%d trial actor(s) still alive after %.0f s (%s); settling the trial folders anyway",
                        len(alive), timeout_s, ", ".join(sorted(set(alive))))
            return alive
        time.sleep(0.5)


def _make_tuner(cfg: Config, dims: Sequence[Dimension], tune_name: str, tune_dir: str,
                tracking_uri: Optional[str], parent_run_id: Optional[str], max_concurrent: int):
    """A new Tuner, or the interrupted one restored when this sweep's folder already holds one."""
    from ray import tune as rtune

    from raytimm import storage

    fs, fs_path = storage.get_filesystem(cfg.storage.path)
    trainable = rtune.with_parameters(_trial_driver, base=config_to_dict(cfg), tune_dir=tune_dir,
                                      tracking_uri=tracking_uri, parent_run_id=parent_run_id)
    # The driver only waits on its TorchTrainer; a zero-CPU request must name some resource
    # (docs/pitfalls-found.md: {"cpu": 0} alone raises), so it asks for one byte of memory.
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
                        cooldown_s=cfg.mlflow.retry_after_s,
                        tags={"raytimm.tune_status": t.status, "raytimm.trial_id": t.trial_id,
                              "raytimm.best_checkpoint": t.checkpoint or ""})
    # The swept values again: a driver stopped early (or whose sends timed out) may never have sent its
    # params, and they are what a user compares trials by. Values already on the server are not resent.
    child.log_params(t.config)
    child.backfill(t.history)  # only the epochs the server does not hold yet
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

"""The thin Ray Train layer: a TorchTrainer whose workers run ``engine.fit``.

Everything a worker does beyond plain PyTorch is here: staging remote data, resuming from
Ray's latest checkpoint, and handing ``prepare_model``/``prepare_data_loader`` and a
``report`` callback to the engine. MLflow logging and the run folder's publication (the
``best``/``latest`` pointers and progress.json, by ``runs.RunFolder``) run in a Train callback
on the controller, which Ray pins to the driver's node, so a local tracking store and the
driver's storage credentials are reachable from there.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from typing import Any, Optional, Sequence

from raytimm.logs import quiet_env

quiet_env()  # before `import ray`, so workers inherit the quiet defaults

import ray  # noqa: E402
import ray.train  # noqa: E402
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig  # noqa: E402
from ray.train import LoggingConfig  # noqa: E402
# DeveloperAPI: the only hook that runs when the controller shuts down (see _CloseTracking).
from ray.train.v2._internal.execution.callback import ControllerCallback  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402

from raytimm import runs, storage  # noqa: E402
from raytimm.envvars import forwarded_env  # noqa: E402
from raytimm.config import Config, config_from_dict, config_to_dict, dump_yaml, flatten_config  # noqa: E402
from raytimm.errors import CheckpointError, RaytimmError, StorageError, is_retryable  # noqa: E402

log = logging.getLogger("raytimm.train")



@dataclasses.dataclass
class TrainResult:
    """What `raytimm train --result-json` writes."""

    run_dir: str
    best_checkpoint: Optional[str]
    best_metrics: dict
    latest_checkpoint: Optional[str]
    mlflow_run_id: Optional[str]
    epochs: int = 0
    status: str = "finished"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------ Ray session

_LOCAL_RAY = {"started": False}  # whether this process started its own (fixed-size) local Ray


def init_ray(*, num_cpus: Optional[int] = None, include_dashboard: Optional[bool] = None) -> None:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`) or start a quiet local Ray."""
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = dict(logging_level=logging.WARNING, log_to_driver=True)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=include_dashboard, **kwargs)
        _LOCAL_RAY["started"] = True


def check_resources(cfg: Config) -> None:
    """Fail fast when the workers can never fit; Ray Train would otherwise wait for them forever.

    On a local Ray this process started, the cluster cannot grow, so a shortfall is an error that
    names the keys to change. On a joined cluster an autoscaler may add nodes: only warn.
    """
    scaling = _scaling(cfg)
    need = {k: v * cfg.scaling.num_workers for k, v in scaling.resources_per_worker.items() if v}
    have = ray.cluster_resources()
    short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if have.get(k, 0.0) + 1e-9 < v}
    if not short:
        return
    what = ", ".join(f"{v:g} {k} (cluster has {h:g})" for k, (v, h) in short.items())
    msg = (f"scaling.num_workers={cfg.scaling.num_workers} needs {what}: lower scaling.num_workers or "
           f"scaling.cpus_per_worker, or set scaling.use_gpu=false")
    if _LOCAL_RAY["started"]:
        raise RaytimmError(msg)
    log.warning("%s; waiting for the cluster to provide them", msg)


def _verbose() -> bool:
    return logging.getLogger("raytimm").getEffectiveLevel() <= logging.DEBUG


def worker_env() -> dict[str, str]:
    """The non-secret environment forwarded to Train workers (envvars.FORWARDED_ENV)."""
    return forwarded_env()


# ------------------------------------------------------------------ worker side

def train_loop_per_worker(config: dict) -> None:
    """Runs on every Train worker: stage data, resume, then ``engine.fit`` with Ray hooks."""
    from raytimm import engine
    from raytimm.logs import worker_logging_setup

    worker_logging_setup()
    cfg = config_from_dict(config["cfg"])
    storage.configure(endpoint_url=cfg.storage.endpoint_url, region=cfg.storage.region)
    # Expanded here, on the worker's node, so `$LOCAL_SSD/raytimm` names each node's own disk.
    cfg.data.cache_dir = os.path.expandvars(os.path.expanduser(cfg.data.cache_dir))
    # A remote data.path is staged by engine.fit (once per node, local rank 0 first), which keeps
    # the bucket URI, not this node's cache folder, in cfg and so in every meta.json.
    cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)) or 1

    run_dir = runs.run_dir(cfg.storage.path, cfg.run.name)
    upload_fn = _bucket_upload_fn(run_dir) if storage.is_remote(cfg.storage.path) else None

    def report(metrics: dict, checkpoint_dir: Optional[str]) -> None:
        ckpt = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=runs.checkpoint_dir_name(metrics["epoch"]),
                         checkpoint_upload_fn=upload_fn if ckpt else None)

    with tempfile.TemporaryDirectory(prefix="raytimm-resume-") as tmp:
        resume_dir, resume_uri = _resume_checkpoint(run_dir, cfg.storage.path, os.path.join(tmp, "ckpt"))
        try:
            engine.fit(
                cfg,
                prepare_model=ray.train.torch.prepare_model,
                prepare_loader=ray.train.torch.prepare_data_loader,
                report=report,
                resume_state_dir=resume_dir,
                device=ray.train.torch.get_device(),
                num_threads=cfg.train.threads or cpus,
            )
        except CheckpointError as e:
            # Name the checkpoint the user can find, not this worker's temporary copy of it.
            if resume_dir and resume_dir in str(e):
                raise CheckpointError(str(e).replace(resume_dir, resume_uri)) from None
            raise


def _resume_checkpoint(run_dir: str, storage_path: str, dest: str) -> tuple[Optional[str], Optional[str]]:
    """(local folder, URI) of the checkpoint to resume from, or (None, None) for a fresh start.

    Ray's latest, unless the run folder holds a newer complete checkpoint: Ray records checkpoints in
    its own file (checkpoint_manager_snapshot.json, written by the controller after each report), and a
    bucket outage can fail that write after the checkpoint itself was uploaded. The folder is the truth
    (runs.py), so a rerun resumes from its newest complete checkpoint and never trains it again.
    """
    latest = ray.train.get_checkpoint()
    ray_epoch = runs.checkpoint_epoch(latest.path) if latest is not None else None
    newest = runs.newest_complete(run_dir)
    if newest is not None and (ray_epoch is None or newest[1] > ray_epoch):
        log.warning("resuming from %s: Ray Train's own record %s", newest[0],
                    f"ends at epoch {ray_epoch}" if ray_epoch is not None else "has no checkpoint")
        return storage.download(newest[0], dest), newest[0]
    if latest is not None:
        return latest.to_directory(dest), checkpoint_uri(latest.path, storage.parse_uri(storage_path).scheme)
    return None, None


def _bucket_upload_fn(run_dir: str):
    """Upload checkpoints with boto3 (fixed-size multipart parts), not pyarrow's copy_files.

    R2 needs equal-sized parts and pyarrow's S3 multipart upload has failed against it
    (apache/arrow#34363); storage.upload is the path we can reason about. meta.json goes
    last (runs.persist_checkpoint), so a folder with meta.json and the weights is complete.
    """
    def upload(checkpoint: Checkpoint, dir_name: str) -> Checkpoint:
        dest = runs.persist_checkpoint(checkpoint.path, storage.join(run_dir, dir_name))
        fs, fs_path = storage.get_filesystem(dest)
        return Checkpoint(path=fs_path, filesystem=fs)

    return upload


# ------------------------------------------------------------------ controller side

class TrackingCallback(ray.train.UserCallback):
    """Logs rank 0's metrics to MLflow and publishes each checkpoint in the run folder.

    Runs in the Train controller, after Ray has persisted the reported checkpoint, so a
    pointer only ever names a complete checkpoint; ``runs.RunFolder`` moves `latest`/`best`
    (the ranking rule of runs.py) and rewrites progress.json. Metrics go to the run's MLflow sender
    thread (tracking.attach_logger), so a slow or dead tracking server never holds up the controller.
    """

    def __init__(self, *, run_dir: str, run_name: str, scheme: str, metric: str, mode: str, epochs: int,
                 mlflow_kwargs: Optional[dict], endpoint_url: Optional[str] = None, region: Optional[str] = None):
        self.run_dir = run_dir
        self.storage_opts = dict(endpoint_url=endpoint_url, region=region)
        self._configured = False
        self.scheme = scheme
        self.mlflow_kwargs = mlflow_kwargs  # tracking.attach_logger's arguments, or None
        # Built in the controller on first use: after a controller restart the new one reads the
        # folder's best pointer and progress history again.
        self.folder_kwargs = dict(run_name=run_name, metric=metric, mode=mode, epochs=epochs,
                                  mlflow_run_id=(mlflow_kwargs or {}).get("run_id"))
        self._folder: Optional[runs.RunFolder] = None
        self._logger = None

    def __getstate__(self) -> dict:
        s = dict(self.__dict__)
        s["_logger"] = None  # a thread: made again in the controller
        s["_folder"] = None
        return s

    def _log_metrics(self, metrics: dict, step: int) -> None:
        if not self.mlflow_kwargs:
            return
        if self._logger is None:
            from raytimm.tracking import attach_logger

            self._logger = attach_logger(**self.mlflow_kwargs)
        self._logger.log_metrics(metrics, step=step)

    def close(self) -> None:
        """Send what is still queued (bounded), so the driver's final backfill finds it on the server."""
        if self._logger is not None:
            self._logger.close()

    def after_report(self, run_context, metrics, checkpoint) -> None:
        m = {k: float(v) for k, v in (metrics[0] if metrics else {}).items() if isinstance(v, (int, float))}
        if "epoch" in m:
            self._log_metrics(m, int(m["epoch"]))
        if checkpoint is None:
            return
        if not self._configured:  # this runs in the controller process, which has its own storage settings
            storage.configure(**self.storage_opts)
            self._configured = True
        if self._folder is None:
            self._folder = runs.RunFolder(self.run_dir, **self.folder_kwargs)
        # Ray's retention ranks checkpoints with the same rule, so `best` always names a kept one.
        self._folder.checkpoint_saved(checkpoint_uri(checkpoint.path, self.scheme), m)


class _CloseTracking(ControllerCallback):
    """Closes TrackingCallback's MLflow sender when the controller shuts down.

    UserCallback has no shutdown hook; without this the driver's end-of-run backfill could race
    a send still in flight from the controller and log an epoch twice.
    """

    def __init__(self, tracking: TrackingCallback):
        self.tracking = tracking  # the same object as in the UserCallback list (one pickled argument)

    async def before_controller_shutdown(self):
        self.tracking.close()


class FailFastCallback(ray.train.UserCallback):
    """Fails the run at the first worker error that a restart cannot fix (errors.is_retryable).

    Ray Train retries every worker error up to FailureConfig.max_failures; an error raised from a
    callback is a controller error, which its default failure policy does not retry. The worker's
    own exception rides along as ``ControllerError.controller_failure``.
    """

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        for _, error in sorted(worker_exceptions.items()):
            if not is_retryable(error):
                raise ray.train.ControllerError(error)


def checkpoint_uri(path: str, scheme: str) -> str:
    """Ray gives bucket paths without a scheme (`bucket/prefix/...`); put ours back."""
    if scheme in ("s3", "r2") and "://" not in path:
        return f"{scheme}://{path}"
    return path


# ------------------------------------------------------------------ driver side

def absolutize_paths(cfg: Config) -> Config:
    """Local paths made absolute: workers and the controller do not share the driver's cwd."""
    def fix(p: Optional[str]) -> Optional[str]:
        if not p or storage.is_remote(p):
            return p
        return os.path.abspath(storage.local_path(p))

    def node_local(p: str) -> str:
        # `~` and `$VAR` name each node's own disk: the worker expands them (train_loop_per_worker).
        return p if p.startswith("~") or "$" in p else fix(p)

    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, path=fix(cfg.data.path) or "", cache_dir=node_local(cfg.data.cache_dir)),
        storage=dataclasses.replace(cfg.storage, path=fix(cfg.storage.path)),
        model=dataclasses.replace(cfg.model, pretrained_file=fix(cfg.model.pretrained_file),
                                  init_checkpoint=fix(cfg.model.init_checkpoint)),
    )


def preflight(cfg: Config) -> None:
    """Fail before any worker starts: storage reachable and writable, data present and sane."""
    if storage.is_remote(cfg.storage.path):
        storage.preflight(cfg.storage.path, want="write")
    if not cfg.data.path:
        raise RaytimmError("data.path is empty: point it at an ImageFolder, DICE export or manifest CSV "
                           "(local, s3:// or r2://)")
    from raytimm.data.loaders import manifest_folder, prepare_dataset_root, scan_dataset

    manifest = cfg.data.format == "manifest"
    if storage.is_remote(cfg.data.path):
        # A manifest's images lie in its folder: that is the dataset to find.
        target = manifest_folder(cfg.data.path)[0] if manifest else cfg.data.path
        storage.preflight(target, want="dataset")
        return
    if not os.path.exists(cfg.data.path):
        raise RaytimmError(f"data.path {cfg.data.path!r} does not exist")
    if not (os.path.isfile if manifest else os.path.isdir)(cfg.data.path):
        raise RaytimmError(f"data.path {cfg.data.path!r} is not a {'file' if manifest else 'folder'}")
    # The workers' own call then finds this DICE conversion in the cache.
    local = prepare_dataset_root(cfg)
    scan = scan_dataset(local, cfg)
    if cfg.model.num_classes is not None and cfg.model.num_classes != len(scan.class_names):
        raise RaytimmError(f"model.num_classes={cfg.model.num_classes} but {local!r} has "
                           f"{len(scan.class_names)} classes: {', '.join(scan.class_names[:10])}")
    if scan.bad_files:
        log.warning("%d unreadable image(s) in %s will be skipped, e.g. %s", len(scan.bad_files), local,
                    scan.bad_files[0][0])


def _scaling(cfg: Config) -> ScalingConfig:
    use_gpu = cfg.scaling.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    resources = dict(cfg.scaling.resources_per_worker)
    resources["CPU"] = cfg.scaling.cpus_per_worker or 1
    if use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    return ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=use_gpu, resources_per_worker=resources,
                         placement_strategy=cfg.scaling.placement_strategy)


def build_trainer(cfg: Config, *, run_name: str, callbacks: list, train_loop=None) -> TorchTrainer:
    """TorchTrainer for cfg: scaling, storage (local or bucket), checkpoint ranking, failures.

    ``train_loop`` replaces ``train_loop_per_worker`` (benchmarks and tests wrap it to inspect each rank).
    """
    fs, fs_path = storage.get_filesystem(cfg.storage.path)
    run_config = RunConfig(
        name=run_name,
        storage_path=fs_path,
        storage_filesystem=fs,
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep,
                                           checkpoint_score_attribute=cfg.checkpoint.metric,
                                           checkpoint_score_order=cfg.checkpoint.mode),
        failure_config=FailureConfig(max_failures=cfg.run.max_failures),
        callbacks=[FailFastCallback(), *callbacks],
        worker_runtime_env={"env_vars": worker_env()},
        # Ray Train's own INFO lines (worker group set-up, every report) are not actionable.
        logging_config=LoggingConfig(log_level="DEBUG" if _verbose() else "WARNING"),
    )
    return TorchTrainer(train_loop or train_loop_per_worker, train_loop_config={"cfg": config_to_dict(cfg)},
                        scaling_config=_scaling(cfg), run_config=run_config)


def train(cfg: Config, *, mlflow_parent_run_id: Optional[str] = None, callbacks: Sequence = (),
          check: bool = True, train_loop=None) -> TrainResult:
    """Run one training job end to end and publish its `best` pointer and final progress.json.

    ``callbacks`` are extra Train callbacks (Tune's TuneReportCallback); ``check=False`` skips the
    data/storage preflight, which a sweep runs once instead of once per trial.
    """
    from raytimm.tracking import default_tracking_uri, make_logger, ray_job_tags, scrub_secrets

    run_name = cfg.run.name or runs.default_run_name(cfg.model.name)
    cfg = absolutize_paths(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=run_name)))
    run_dir = runs.run_dir(cfg.storage.path, run_name)
    scheme = storage.parse_uri(cfg.storage.path).scheme
    storage.configure(endpoint_url=cfg.storage.endpoint_url, region=cfg.storage.region)
    if check:
        preflight(cfg)

    # A storage error here propagates: read as "not complete" it would restart a finished run.
    done = runs.completed(run_dir, epochs=cfg.train.epochs, patience=cfg.train.patience)
    if done is not None:
        best = runs.read_pointer(run_dir, "best") or {}
        how = "stopped early" if done.get("early_stopped") else f"{cfg.train.epochs} epochs"
        print(f"run {run_name!r} is already complete ({how}) in {run_dir}; "
              f"raise train.epochs to continue it, or pick a new run.name")
        return TrainResult(run_dir=run_dir, best_checkpoint=best.get("checkpoint"), best_metrics=best.get("metrics", {}),
                           latest_checkpoint=done.get("checkpoint"), mlflow_run_id=None,
                           epochs=done["epoch"], status="already_complete")

    init_ray()
    check_resources(cfg)

    # MLflow: one run per training run name, continued when the same run name comes back. This
    # process and the controller each hold one sender thread for it (tracking.MlflowLogger).
    mlflow_kwargs = None
    logger = None
    if cfg.mlflow.enabled:
        uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(cfg.storage.path)
        logger = make_logger(enabled=True, tracking_uri=uri, experiment=cfg.mlflow.experiment, run_name=run_name,
                             resume_by_name=True, parent_run_id=mlflow_parent_run_id, timeout_s=cfg.mlflow.timeout_s,
                             cooldown_s=cfg.mlflow.retry_after_s)
        if logger.run_id:
            mlflow_kwargs = dict(tracking_uri=uri, run_id=logger.run_id, timeout_s=cfg.mlflow.timeout_s,
                                 cooldown_s=cfg.mlflow.retry_after_s)
            logger.log_params(scrub_secrets(flatten_config(cfg)))
            logger.set_tags({"raytimm.run_dir": run_dir, **ray_job_tags()})
            logger.log_text(dump_yaml(cfg), "config.yaml")
            # On the server before any worker starts: a Tune trial's driver may be stopped (killed) early.
            logger.flush()
        else:
            logger = None  # tracking unreachable: make_logger warned once; train without it

    folder = runs.RunFolder(run_dir, run_name=run_name, metric=cfg.checkpoint.metric, mode=cfg.checkpoint.mode,
                            epochs=cfg.train.epochs, mlflow_run_id=logger.run_id if logger else None)
    folder.start()
    callback = TrackingCallback(run_dir=run_dir, run_name=run_name, scheme=scheme, metric=cfg.checkpoint.metric,
                                mode=cfg.checkpoint.mode, epochs=cfg.train.epochs, mlflow_kwargs=mlflow_kwargs,
                                endpoint_url=cfg.storage.endpoint_url, region=cfg.storage.region)
    trainer = build_trainer(cfg, run_name=run_name, callbacks=[callback, _CloseTracking(callback), *callbacks],
                            train_loop=train_loop)
    try:
        result = trainer.fit()
    except Exception as e:
        error = e
    else:
        error = result.error
    if error is not None:
        if logger is not None:
            logger.finish("FAILED")
        failure = training_error(run_name, error, scheme=scheme)
        # A bucket outage that outlasted the retries: the StorageError naming the URI, in progress.json too.
        line = f"StorageError: {failure}" if isinstance(failure, StorageError) else _failure_line(error)
        _mark_failed(folder, f"training run {run_name!r} failed: {line}")
        raise failure from None
    folder.reload()  # the controller's callback published every epoch since start()

    best = runs.best_of(sorted(result.best_checkpoints or [], key=lambda cm: float(cm[1].get("epoch", 0))),
                        metric=cfg.checkpoint.metric, mode=cfg.checkpoint.mode, metrics_of=lambda cm: cm[1])
    best_uri = checkpoint_uri(best[0].path, scheme) if best else None
    best_metrics = {k: v for k, v in best[1].items() if isinstance(v, (int, float))} if best else {}
    latest_uri = checkpoint_uri(result.checkpoint.path, scheme) if result.checkpoint else None
    if best_uri:
        folder.set_best(best_uri, best_metrics)
    out = TrainResult(run_dir=run_dir, best_checkpoint=best_uri, best_metrics=best_metrics,
                      latest_checkpoint=latest_uri, mlflow_run_id=logger.run_id if logger else None,
                      epochs=int((result.metrics or {}).get("epoch", 0)))
    if logger is not None:
        # The backfill re-reads the server's history first, so it adds only the epochs the
        # controller could not send (a tracking outage), each once.
        _log_final_artifacts(logger, best_uri, out)
        logger.finish("FINISHED")
    folder.latest_checkpoint = latest_uri or folder.latest_checkpoint
    folder.finish("finished" if out.epochs >= cfg.train.epochs else "stopped_early")
    return out


def _first_failure(error: BaseException) -> tuple[Optional[int], BaseException]:
    """The error that failed the run and its worker rank: the lowest failed rank's own error, the
    worker error FailFastCallback carried, or the cause of Ray's wrapper (rank None)."""
    from ray.train import ControllerError, WorkerGroupError

    if not isinstance(error, (ControllerError, WorkerGroupError)):
        error = error.__cause__ or error  # Ray may wrap them once more
    if isinstance(error, WorkerGroupError) and error.worker_failures:
        return min(error.worker_failures.items())
    if isinstance(error, ControllerError):
        return None, error.controller_failure
    return None, error


def training_error(run_name: str, error: BaseException, *, scheme: str = "file") -> RaytimmError:
    """One line for a failed run: a worker's raytimm error as it was raised (e.g. a StorageError
    that outlasted run.max_failures restarts), pyarrow's S3 error from Ray Train's own files as a
    StorageError naming the URI (``scheme``: storage.path's), else the first failure named."""
    rank, cause = _first_failure(error)
    if isinstance(cause, RaytimmError):
        return cause
    if scheme in ("s3", "r2"):  # the controller writes checkpoint_manager_snapshot.json & co. with pyarrow
        from raytimm.storage.arrowfs import arrow_storage_error

        failed_storage = arrow_storage_error(cause, scheme)
        if failed_storage is not None:
            return failed_storage
    if rank is None:
        return RaytimmError(f"training run {run_name!r} failed: {_cause_line(cause)}")
    return RaytimmError(f"training run {run_name!r} failed on worker rank {rank}: {_cause_line(cause)} "
                        "(see the worker log above)")


def _failure_line(error: BaseException) -> str:
    """What went wrong in one line: the first failed worker's own error, not Ray's multi-line wrapper."""
    _, cause = _first_failure(error)
    return _cause_line(cause)


def _cause_line(cause: BaseException) -> str:
    return f"{type(cause).__name__}: {runs.error_line(cause)}"


def _mark_failed(folder: runs.RunFolder, message: str) -> None:
    """progress.json says the run failed, with ``message``; the run's own error is what the caller
    raises, so a store that cannot take this write only costs a warning."""
    try:
        folder.reload()  # the controller's callback published epochs since start()
        folder.finish("failed", message)
    except Exception as e:  # noqa: BLE001 - the training error above is the one to report
        log.warning("could not mark %s as failed in progress.json: %s", folder.run_dir, e)


def _log_final_artifacts(logger, best_uri: Optional[str], out: TrainResult) -> None:
    """Backfilled epoch metrics; tags with checkpoint URIs; classes.txt, the best epoch's confusion
    matrix and per-class CSV (multi-label: the per-label CSV), and the loss/accuracy curves of the whole run."""
    from raytimm import plots
    from raytimm.checkpoint import load_meta

    best_epoch = out.best_metrics.get("epoch")
    logger.set_tags({"raytimm.best_checkpoint": best_uri or "", "raytimm.latest_checkpoint": out.latest_checkpoint or "",
                     "raytimm.best_epoch": str(int(best_epoch)) if best_epoch is not None else ""})
    try:
        best = load_meta(best_uri) if best_uri else {}
        latest = load_meta(out.latest_checkpoint) if out.latest_checkpoint else best
    except Exception as e:  # artifacts are a courtesy; the run itself succeeded
        log.warning("could not read checkpoint metadata for MLflow artifacts: %s", e)
        return
    history = latest.get("history") or []
    logger.backfill(history)
    with tempfile.TemporaryDirectory() as tmp:
        names = best.get("class_names") or latest.get("class_names") or []
        p = os.path.join(tmp, "classes.txt")
        with open(p, "w", encoding="utf-8") as f:
            f.write("\n".join(names) + "\n")
        logger.log_artifact(p)
        cm = best.get("confusion_matrix")
        if best.get("multi_label") and best.get("per_class"):
            csv = os.path.join(tmp, "per_class.csv")
            plots.per_label_csv(best["per_class"], csv)
            logger.log_artifact(csv)
        elif cm:
            png, csv = os.path.join(tmp, "confusion_matrix.png"), os.path.join(tmp, "per_class.csv")
            plots.confusion_matrix_png(cm, names, png, title=f"best epoch {best.get('epoch')}")
            plots.per_class_csv(cm, names, csv)
            logger.log_artifact(png)
            logger.log_artifact(csv)
        if history:
            png = os.path.join(tmp, "curves.png")
            plots.curves_png(history, png)
            logger.log_artifact(png)

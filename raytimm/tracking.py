"""MLflow tracking for rank 0 or the driver, and a null logger for everyone else.

This is the only module that imports mlflow. Tracking must never kill or stall training: a run's
MLflow calls are made by one sender thread (tracking_sender.py), so logging never waits on the
server; after a failure the sender warns once, pauses for a cooldown and later sends what was
missed, exactly once. Params never contain secrets (see ``scrub_secrets``).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

from raytimm import storage
# scrub_secrets/redact_uri are shared with checkpoint.py (meta.json); re-exported for callers here.
from raytimm.secrets import redact_uri, scrub_secrets  # noqa: F401
from raytimm.tracking_sender import Sender

log = logging.getLogger("raytimm.tracking")

# MLflow's own limits (mlflow/utils/validation.py); exceeding them rejects the whole batch.
MAX_PARAM_VALUE_LEN = 6000
MAX_TAG_VALUE_LEN = 8000
MAX_KEY_LEN = 250
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

_BAD_KEY_CHARS_RE = re.compile(r"[^/\w.\- ]")

PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own tag for nested runs (mlflow.utils.mlflow_tags)
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
DEFAULT_COOLDOWN_S = 60.0
# A local sqlite store creates its schema on first use: seconds, more on a busy machine.
LOCAL_STORE_CALL_TIMEOUT_S = 120.0


@runtime_checkable
class MetricLogger(Protocol):
    """What training code needs from a tracker; implemented by MlflowLogger and NullLogger."""

    @property
    def run_id(self) -> str | None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def backfill(self, history: list[Mapping[str, Any]]) -> None: ...

    def finish(self, status: str = "FINISHED") -> None: ...


class NullLogger:
    """A MetricLogger that records nothing (non-zero ranks, tracking disabled or unreachable)."""

    @property
    def run_id(self) -> str | None:
        return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def backfill(self, history: list[Mapping[str, Any]]) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


# --------------------------------------------------------------------------- helpers


def _param_str(value: Any) -> str:
    """Stringify a param value the way a reader expects (lists as JSON, not Python reprs)."""
    if isinstance(value, (list, tuple)):
        try:
            return json.dumps(list(value), default=str)
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def flatten_params(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested dict to ``{"a.b": "value"}`` with string values, as MLflow params need."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, name))
        else:
            out[name] = _param_str(value)
    return out


def sanitize_key(key: str) -> str:
    """Make ``key`` a valid MLflow param/metric/tag name (``/`` is allowed, e.g. ``val/top1``)."""
    cleaned = _BAD_KEY_CHARS_RE.sub("_", str(key))
    # MLflow rejects names that normalise to another path (leading '/', '//', '..').
    cleaned = re.sub(r"/+", "/", cleaned).strip("/")
    cleaned = "/".join(part if part not in (".", "..") else "_" for part in cleaned.split("/"))
    return (cleaned or "_")[:MAX_KEY_LEN]


def _truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _is_local_store(uri: str) -> bool:
    return not uri.startswith(("http://", "https://", "databricks"))


def _call_timeout(tracking_uri: str, timeout_s: float) -> float:
    """Outer bound for one MLflow call. The HTTP timeout bounds each request; this also covers
    calls made of several requests, slow trickles, and local stores that have no HTTP timeout."""
    if _is_local_store(tracking_uri):
        return max(float(timeout_s), LOCAL_STORE_CALL_TIMEOUT_S)
    return float(timeout_s) + 2.0


def configure_http_timeouts(timeout_s: float) -> None:
    """Bound MLflow's HTTP client (defaults: 120 s timeout, 5 retries with backoff).

    Uses setdefault so a user's explicit environment wins. Read by mlflow at call time.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, math.ceil(timeout_s))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def _bounded_call(fn: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Run ``fn`` in a daemon thread and wait at most ``timeout_s``; raise TimeoutError after.

    Only for one-off lookups (``find_run``); a run's own calls go through its sender thread.
    A daemon thread so a hung request can never block interpreter exit; its late result is dropped.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"raytimm-mlflow-{what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {timeout_s:.0f}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _error_summary(exc: BaseException) -> str:
    """One short line naming the failure, without credentials.

    MLflow wraps urllib3 errors in a long message; keep the endpoint, the root cause class
    (NewConnectionError, ReadTimeoutError, ...) and the OS error if there is one.
    """
    text = " ".join(str(exc).split())
    cause = re.search(r"Caused by (\w+)", text)
    if cause:
        endpoint = re.search(r"API request to (\S+) failed", text)
        os_error = re.search(r"\[Errno -?\d+\] [^'\")]+", text)
        text = cause.group(1) + (f" {os_error.group(0)}" if os_error else "")
        if endpoint:
            text += f" ({endpoint.group(1).split('?')[0]})"
    return redact_uri(f"{type(exc).__name__}: {text}")[:300]


# --------------------------------------------------------------------------- locations


def default_tracking_uri(storage_path: str | os.PathLike | None = "./runs") -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else an embedded sqlite store next to the local runs folder.

    ``<storage_path>/mlflow.db`` when storage is local, ``./runs/mlflow.db`` when it is remote.
    """
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if env_uri:
        return env_uri
    path = storage.local_path(str(storage_path or "./runs")) or "./runs"  # a bucket: keep the store local
    db = Path(path).resolve() / "mlflow.db"
    # sqlite:/// + an absolute path gives the four slashes sqlite needs.
    return f"sqlite:///{db}"


def local_artifact_location(tracking_uri: str) -> str | None:
    """``file://<dir>/mlartifacts`` beside a sqlite store; None (server default) otherwise."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri[len("sqlite:///"):])
    return (db.parent / "mlartifacts").resolve().as_uri()


def ray_job_tags() -> dict[str, str]:
    """Tags that link an MLflow run to its Ray job, when there is one.

    ``ray job submit`` starts the entrypoint with ``RAY_JOB_CONFIG_JSON_ENV_VAR`` whose metadata
    holds ``job_submission_id`` (ray/dashboard/modules/job/job_supervisor.py); that is the id
    ``ray job logs`` takes. The driver's core job id comes from the runtime context, only if Ray
    is already initialised (this module never imports ray itself).
    """
    tags: dict[str, str] = {}
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if raw:
        try:
            submission_id = (json.loads(raw).get("metadata") or {}).get("job_submission_id")
        except (ValueError, AttributeError):
            submission_id = None
        if submission_id:
            tags["ray.job_id"] = str(submission_id)
    ray = sys.modules.get("ray")
    if ray is not None:
        try:
            if ray.is_initialized():
                tags["ray.driver_job_id"] = str(ray.get_runtime_context().get_job_id())
        except Exception:  # noqa: BLE001 - a tag is never worth failing for
            pass
    return tags


# --------------------------------------------------------------------------- MLflow


def _client(tracking_uri: str):
    import mlflow  # only here: keeps `import raytimm.tracking` light for workers

    if tracking_uri.startswith("sqlite:///"):
        # sqlite cannot create the folder of its database file.
        Path(tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return mlflow.MlflowClient(tracking_uri=tracking_uri)


def _get_or_create_experiment(client, name: str, artifact_location: str | None) -> str:
    """Experiment id for ``name``, creating it; tolerant of a concurrent creator (Tune trials)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


class _MlflowSink:
    """The MLflow calls of one run (tracking_sender.Sink); only the sender's thread makes them."""

    def __init__(self, tracking_uri: str, run_id: str | None):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._client = None

    @property
    def client(self):
        """The MlflowClient, made on first use: on the sender's thread, so importing mlflow and opening
        the store never block the caller (a Ray Train controller), and failing is a sender failure."""
        if self._client is None:
            self._client = _client(self.tracking_uri)
        return self._client

    @client.setter
    def client(self, value) -> None:
        self._client = value

    def sync(self) -> tuple[dict[str, str], set[tuple[str, int]]]:
        run = self.client.get_run(self.run_id)
        steps = set()
        for key in run.data.metrics:
            steps.update((key, int(m.step)) for m in self.client.get_metric_history(self.run_id, key))
        return dict(run.data.params), steps

    def send_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[start:start + MAX_PARAMS_PER_BATCH])

    def send_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in tags.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=items[start:start + MAX_PARAMS_PER_BATCH])

    def send_metrics(self, metrics: list[tuple[str, float, int, int]]) -> None:
        from mlflow.entities import Metric

        items = [Metric(k, v, ts, step) for k, v, ts, step in metrics]
        for start in range(0, len(items), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[start:start + MAX_METRICS_PER_BATCH])

    def send_file(self, kind: str, payload: str, target: str | None) -> None:
        if kind == "text":
            self.client.log_text(self.run_id, payload, target)
        elif kind == "folder":
            self.client.log_artifacts(self.run_id, payload, target)
        else:
            self.client.log_artifact(self.run_id, payload, target)

    def send_status(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


class MlflowLogger:
    """MetricLogger backed by an explicit ``MlflowClient`` (no fluent global run: Tune runs many).

    Construction opens (or creates) the run and raises on failure (``make_logger`` turns that into
    a NullLogger), except with ``wait=False``, which attaches to ``run_id`` in the background. After
    that no method waits on the server: data goes to one sender thread (tracking_sender.Sender),
    which stops calling for ``cooldown_s`` after a failure and sends what was missed when the server
    answers again. ``finish`` waits for the sender while its calls keep completing: a dead or hung
    server costs it at most one call timeout (``timeout_s + 2``), a busy one at most 10 of them.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str | None,
        *,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        timeout_s: float = 10.0,
        cooldown_s: float = DEFAULT_COOLDOWN_S,
        resume_by_name: bool = False,
        wait: bool = True,
    ) -> None:
        configure_http_timeouts(timeout_s)
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.timeout_s = float(timeout_s)
        self._call_timeout_s = _call_timeout(tracking_uri, self.timeout_s)
        self._finished = False
        self._staging: str | None = None
        self._run_id: str | None = run_id
        self._sink = _MlflowSink(tracking_uri, run_id)
        self._sender = Sender(self._sink, where=redact_uri(tracking_uri), cooldown_s=cooldown_s,
                              describe=_error_summary)
        if not wait:
            if run_id is None:
                raise ValueError("MlflowLogger(wait=False) attaches to an existing run: give run_id")
            self._sender.start()  # the client is made by the sender's first call (a sync)
            return
        self._sender.start(lambda: self._open(run_name, run_id, parent_run_id, tags or {}, resume_by_name),
                           self._call_timeout_s)

    # -- setup (on the sender thread; may raise) --------------------------------------

    def _open(self, run_name, run_id, parent_run_id, tags: Mapping[str, Any], resume_by_name: bool) -> None:
        client = _client(self.tracking_uri)
        if run_id is None and resume_by_name and run_name:
            run_id = _find_run(client, self.experiment, run_name)
        if run_id is not None:
            run = client.get_run(run_id)
            if run.info.status != "RUNNING":
                # A resumed run continues the same MLflow run, so it is running again.
                client.update_run(run_id, status="RUNNING")
        else:
            experiment_id = _get_or_create_experiment(
                client, self.experiment, local_artifact_location(self.tracking_uri)
            )
            run_tags = {PARENT_RUN_TAG: parent_run_id} if parent_run_id else {}
            run = client.create_run(experiment_id, run_name=run_name, tags=run_tags)
            run_id = run.info.run_id
        self._sink.client, self._sink.run_id, self._run_id = client, run_id, run_id
        self._sender.mark_synced(*(self._sink.sync() if run.data.metrics or run.data.params else ({}, set())))
        if parent_run_id and run.data.tags.get(PARENT_RUN_TAG) != parent_run_id:
            client.set_tag(run_id, PARENT_RUN_TAG, parent_run_id)
        if tags:
            self.set_tags(tags)

    # -- MetricLogger -----------------------------------------------------------------

    @property
    def run_id(self) -> str | None:
        return self._run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (nested dicts flattened, secrets dropped); re-logging same values is a no-op."""
        if self._finished:
            return
        flat = {sanitize_key(k): _truncate(v, MAX_PARAM_VALUE_LEN)
                for k, v in flatten_params(scrub_secrets(params)).items()}
        # MLflow rejects a changed value for a logged param; the first one is kept.
        changed = self._sender.add_params(flat)
        if changed:
            log.warning(
                "MLflow params already logged with other values, kept the old ones: %s",
                ", ".join(sorted(changed)[:10]),
            )

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log numeric metrics at ``step`` (the epoch); a (key, step) already logged is skipped."""
        if self._finished:
            return
        fresh: dict[str, float] = {}
        for key, value in metrics.items():
            try:
                fresh[sanitize_key(key)] = float(value)
            except (TypeError, ValueError):
                log.debug("metric %s=%r is not a number; not logged", key, value)
        if fresh:
            self._sender.add_metrics(fresh, int(step))

    def backfill(self, history: list[Mapping[str, Any]]) -> None:
        """Log each epoch of ``history`` that the server does not hold yet (re-reads the server first)."""
        if self._finished:
            return
        self._sender.resync()
        for row in history:
            if "epoch" in row:
                self.log_metrics({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=int(row["epoch"]))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (e.g. checkpoint URIs); later values overwrite earlier ones."""
        if self._finished or not tags:
            return
        self._sender.add_tags({sanitize_key(k): _truncate(str(v), MAX_TAG_VALUE_LEN)
                               for k, v in scrub_secrets(tags).items() if v is not None})

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file, or a folder's contents, under ``artifact_path`` of the run.

        A copy is queued, so the caller may delete its file as soon as this returns.
        """
        if self._finished:
            return
        path = Path(local_path)
        if self._staging is None:
            self._staging = tempfile.mkdtemp(prefix="raytimm-mlflow-")
        slot = tempfile.mkdtemp(dir=self._staging)
        try:
            if path.is_dir():
                shutil.copytree(path, slot, dirs_exist_ok=True)
                self._sender.add_file("folder", slot, artifact_path, cleanup=slot)
            else:
                copy = shutil.copy2(path, os.path.join(slot, path.name))
                self._sender.add_file("file", copy, artifact_path, cleanup=slot)
        except OSError as exc:
            shutil.rmtree(slot, ignore_errors=True)
            log.warning("MLflow artifact %s not logged: %s", path, exc)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store ``text`` as the artifact file ``artifact_file`` (e.g. ``reports/data.txt``)."""
        if not self._finished:
            self._sender.add_file("text", text, artifact_file)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything queued was sent; False after a failed attempt, or when no call completes
        within ``timeout_s`` (default: the call timeout, ``timeout_s + 2`` for a server)."""
        return self._sender.flush(self._call_timeout_s if timeout_s is None else timeout_s)

    def close(self, timeout_s: float | None = None) -> None:
        """Flush (bounded), then stop the sender; the run's status is left as it is."""
        if self._finished:
            return
        self._finished = True
        self._end(self.flush(timeout_s))

    def finish(self, status: str = "FINISHED") -> None:
        """Send what is queued, mark the run terminated with ``status``; later calls do nothing."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"finish(status={status!r}): expected one of {TERMINAL_STATUSES}")
        if self._finished:
            return
        self._finished = True
        self._sender.set_status(status)
        self._end(self.flush())

    def _end(self, sent: bool) -> None:
        if not sent:
            log.warning("MLflow at %s: not recorded: %s", redact_uri(self.tracking_uri),
                        self._sender.pending_summary() or "the last call")
        self._sender.stop()
        self._sender.discard_pending()
        if self._staging:
            shutil.rmtree(self._staging, ignore_errors=True)


# --------------------------------------------------------------------------- factories


def make_logger(
    *,
    enabled: bool,
    tracking_uri: str | None,
    experiment: str,
    run_name: str | None,
    run_id: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
    timeout_s: float = 10.0,
    cooldown_s: float = DEFAULT_COOLDOWN_S,
    resume_by_name: bool = False,
    storage_path: str | os.PathLike | None = "./runs",
) -> MetricLogger:
    """An MlflowLogger, or a NullLogger (with one warning) when disabled or unreachable.

    ``tracking_uri=None`` means ``default_tracking_uri(storage_path)``. Ray job ids are added
    as tags automatically; explicit ``tags`` win. ``resume_by_name`` continues the newest run
    called ``run_name`` when there is one (the lookup is part of opening the run).
    """
    if not enabled:
        return NullLogger()
    uri = tracking_uri or default_tracking_uri(storage_path)
    all_tags = {**ray_job_tags(), **(tags or {})}
    try:
        return MlflowLogger(
            uri, experiment, run_name, run_id=run_id, parent_run_id=parent_run_id,
            tags=all_tags, timeout_s=timeout_s, cooldown_s=cooldown_s, resume_by_name=resume_by_name,
        )
    except Exception as exc:  # noqa: BLE001 - tracking never kills training
        log.warning(
            "MLflow tracking at %s unavailable (%s); training continues without MLflow",
            redact_uri(uri), _error_summary(exc),
        )
        return NullLogger()


def attach_logger(tracking_uri: str, run_id: str, *, timeout_s: float = 10.0,
                  cooldown_s: float = DEFAULT_COOLDOWN_S) -> MlflowLogger:
    """A logger for a run another process opened; it never waits on the server, not even here."""
    return MlflowLogger(tracking_uri, "", None, run_id=run_id, timeout_s=timeout_s, cooldown_s=cooldown_s,
                        wait=False)


def _find_run(client, experiment: str, run_name: str) -> str | None:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    quoted = run_name.replace("\\", "\\\\").replace("'", "\\'")
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"attributes.run_name = '{quoted}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def find_run(tracking_uri: str, experiment: str, run_name: str, *, timeout_s: float = 10.0) -> str | None:
    """Id of the newest run called ``run_name`` in ``experiment``, or None (also when unreachable)."""
    configure_http_timeouts(timeout_s)
    try:
        return _bounded_call(lambda: _find_run(_client(tracking_uri), experiment, run_name),
                             _call_timeout(tracking_uri, timeout_s), "find_run")
    except Exception as exc:  # noqa: BLE001
        log.warning(
            "MLflow run lookup %r at %s failed (%s); starting a new run",
            run_name, redact_uri(tracking_uri), _error_summary(exc),
        )
        return None

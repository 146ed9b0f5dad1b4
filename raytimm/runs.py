"""The run folder ``<storage.path>/<run.name>/``: one owner for its layout and its rules.

    checkpoint_000001/ ...   one complete checkpoint folder per kept epoch (checkpoint.py's format)
    best, latest             JSON pointers naming a checkpoint (format and reading: checkpoint.py)
    progress.json            where the run stands, rewritten after every epoch

The rules every writer follows (the one-process reporter here, the Ray Train controller callback,
the driver's end of ``ray_train.train``, Tune's publication of a sweep):

- Ranking: a checkpoint is better when its metric is better; a tie goes to the later checkpoint,
  as Ray's ``CheckpointConfig`` retention does; a missing or NaN metric never wins. The engine's
  ``*best`` mark and ``meta.best_epoch``, the ``best`` pointer, retention and Tune all use
  ``is_better`` / ``best_of`` / ``to_keep`` below. (Early stopping is the one different question:
  ``train.patience`` counts epochs without a strict improvement, ``improves``.)
- Pointers move only after their checkpoint is complete (checkpoint.py refuses otherwise).
- Retention: the best ``checkpoint.num_to_keep`` plus the latest survive.
- A run is complete when its ``latest`` checkpoint reached ``train.epochs``, or patience ran out there.
- Storage failures propagate (StorageError naming the URI); only a missing file means "nothing there".
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import shutil
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar

from raytimm import storage
from raytimm.errors import CheckpointError, RaytimmError

CHECKPOINT_PREFIX = "checkpoint_"
PROGRESS_FILE = "progress.json"
PROGRESS_VERSION = 1
STATUSES = ("running", "finished", "failed", "stopped_early")
_CHECKPOINT_RE = re.compile(r"checkpoint_(\d+)")

T = TypeVar("T")


# ------------------------------------------------------------------ names

def checkpoint_dir_name(epoch: int) -> str:
    """Folder name of an epoch's checkpoint (the name Ray's ``checkpoint_dir_name`` gets too)."""
    return f"{CHECKPOINT_PREFIX}{int(epoch):06d}"


def checkpoint_epoch(name: str) -> Optional[int]:
    """The epoch of a ``checkpoint_NNNNNN`` folder name, else None."""
    m = _CHECKPOINT_RE.fullmatch(name.rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


def default_run_name(model_name: str) -> str:
    """``<model>-<local time>``: the run name when ``run.name`` is not set."""
    return f"{model_name.replace('/', '_')}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def run_dir(storage_path: str, run_name: str) -> str:
    """``<storage.path>/<run.name>`` as a local path or bucket URI."""
    return storage.join(storage_path, run_name)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------ ranking

def score(metrics: Optional[Mapping], metric: str) -> Optional[float]:
    """The metric as a float, or None when it is missing, not a number, or NaN (it never ranks)."""
    v = (metrics or {}).get(metric)
    if v is None or isinstance(v, (bool, str)):
        return None
    try:
        v = float(v)  # also numpy scalars (Tune's dataframes)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def is_better(candidate: Optional[Mapping], incumbent: Optional[Mapping], *, metric: str, mode: str) -> bool:
    """Whether ``candidate`` (a later checkpoint's metrics) ranks above ``incumbent`` (an earlier one's, or None).

    A tie goes to the candidate, the later checkpoint, as in Ray's retention; NaN never wins.
    """
    c = score(candidate, metric)
    if c is None:
        return False
    i = score(incumbent, metric)
    if i is None:
        return True
    return c >= i if mode == "max" else c <= i


def improves(candidate: Optional[Mapping], incumbent: Optional[Mapping], *, metric: str, mode: str) -> bool:
    """A strict improvement: what ``train.patience`` waits for (a tie moves `best` but is no progress)."""
    c, i = score(candidate, metric), score(incumbent, metric)
    if c is None:
        return False
    return i is None or (c > i if mode == "max" else c < i)


def best_of(items: Sequence[T], *, metric: str, mode: str,
            metrics_of: Callable[[T], Mapping] = lambda x: x) -> Optional[T]:
    """The best of ``items`` (oldest first) by ``is_better``; None when no item has the metric."""
    best: Optional[T] = None
    for item in items:
        if is_better(metrics_of(item), metrics_of(best) if best is not None else None, metric=metric, mode=mode):
            best = item
    return best


def to_keep(entries: Sequence[tuple[int, Optional[Mapping]]], *, metric: str, mode: str, num_to_keep: int) -> set[int]:
    """Epochs that retention keeps: the best ``num_to_keep`` by the ranking rule, plus the latest.

    ``entries`` are (epoch, metrics) pairs. As in Ray, checkpoints without a usable metric rank
    last (kept only while there are fewer than ``num_to_keep`` others).
    """
    if not entries:
        return set()
    sign = 1.0 if mode == "max" else -1.0

    def rank(e: tuple[int, Optional[Mapping]]) -> tuple:
        s = score(e[1], metric)
        return (s is not None, sign * s if s is not None else 0.0, e[0])  # later epoch wins a tie

    ranked = sorted(entries, key=rank, reverse=True)
    return {int(e[0]) for e in ranked[:max(num_to_keep, 0)]} | {max(int(e[0]) for e in entries)}


# ------------------------------------------------------------------ checkpoints in the folder

def list_checkpoints(run_dir_uri: str) -> list[tuple[str, int, bool]]:
    """(URI, epoch, complete) of every ``checkpoint_NNNNNN`` folder in the run folder, oldest first.

    The folder is the truth: a checkpoint is complete when model.safetensors and meta.json are there.
    """
    from raytimm.checkpoint import META_FILE, MODEL_FILE

    files: dict[str, set] = {}
    for f in storage.list_files(run_dir_uri):
        parts = f.key.split("/")
        if len(parts) == 2 and checkpoint_epoch(parts[0]) is not None:
            files.setdefault(parts[0], set()).add(parts[1])
    return [(storage.join(run_dir_uri, name), checkpoint_epoch(name), {META_FILE, MODEL_FILE} <= names)
            for name, names in sorted(files.items(), key=lambda kv: checkpoint_epoch(kv[0]))]


def newest_complete(run_dir_uri: str) -> Optional[tuple[str, int]]:
    """(URI, epoch) of the run folder's newest complete checkpoint, or None: where a rerun resumes."""
    done = [(uri, epoch) for uri, epoch, complete in list_checkpoints(run_dir_uri) if complete]
    return done[-1] if done else None


def persist_checkpoint(local_dir: str, dest: str, *, move: bool = False) -> str:
    """Copy a finished local checkpoint folder to ``dest`` (folder or bucket prefix); meta.json lands last.

    Locally the folder is built under a temporary name and renamed, so ``dest`` never holds half a
    checkpoint. In a bucket each file is one upload (boto3, equal-sized multipart parts: R2 needs
    them) in an order that puts meta.json last, so a prefix with meta.json is complete.
    """
    from raytimm.checkpoint import META_FILE

    if storage.is_remote(dest):
        for name in sorted(os.listdir(local_dir), key=lambda n: (n == META_FILE, n)):
            storage.upload(os.path.join(local_dir, name), storage.join(dest, name))
        return dest
    dest = storage.normalize(dest)
    tmp = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if move:
        shutil.move(local_dir, tmp)
    else:
        shutil.copytree(local_dir, tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private; a run folder's checkpoints are as readable as the folder
    if os.path.exists(dest):  # the same epoch again (resumed from an earlier checkpoint): the new one wins
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def prune(run_dir_uri: str, *, metric: str, mode: str, num_to_keep: int,
          known: Optional[Mapping[int, Mapping]] = None) -> list[str]:
    """Delete the checkpoints retention does not keep (see ``to_keep``); returns the URIs deleted.

    ``known`` gives metrics by epoch; other checkpoints' metrics are read from their meta.json
    (an incomplete one ranks last).
    """
    from raytimm.checkpoint import load_meta

    entries, uris = [], {}
    for uri, epoch, complete in list_checkpoints(run_dir_uri):
        metrics = (known or {}).get(epoch)
        if metrics is None and complete:
            metrics = load_meta(uri).get("metrics") or {}
        entries.append((epoch, metrics))
        uris[epoch] = uri
    keep = to_keep(entries, metric=metric, mode=mode, num_to_keep=num_to_keep)
    gone = [uris[e] for e, _ in entries if e not in keep]
    for uri in gone:
        storage.delete(uri)
    return gone


# ------------------------------------------------------------------ pointers and completion

def read_pointer(run_dir_uri: str, name: str) -> Optional[dict]:
    """A ``best``/``latest`` pointer ({checkpoint (absolute), metrics, updated}); None only when it does
    not exist. An unreadable store raises StorageError, a corrupt pointer CheckpointError."""
    from raytimm.checkpoint import read_pointer_info

    return read_pointer_info(run_dir_uri, name)


def completed(run_dir_uri: str, *, epochs: int, patience: int = 0) -> Optional[dict]:
    """The ``latest`` pointer of a run that already finished (all epochs, or patience ran out), else None.

    Errors are never read as "not complete": a storage failure or a pointer naming an unreadable
    checkpoint raises, so a transient bucket error cannot restart a finished run from scratch.
    """
    from raytimm.checkpoint import load_meta

    latest = read_pointer(run_dir_uri, "latest")
    if latest is None:
        return None
    epoch = score(latest.get("metrics"), "epoch")
    meta = None
    if epoch is None or (patience and epoch < epochs):
        try:
            meta = load_meta(latest["checkpoint"])
        except CheckpointError as e:
            raise CheckpointError(f"the 'latest' pointer in {run_dir_uri} names {latest['checkpoint']}, "
                                  f"which cannot be read: {e}") from None
        epoch = float(meta.get("epoch") or 0)
    latest["epoch"] = int(epoch)
    if epoch >= epochs:
        return latest
    if patience and meta is not None:
        # epochs_without_improvement is in every meta.json since the ranking rule moved here; older
        # checkpoints only have best_epoch, which was then the last strict improvement.
        stale = meta.get("epochs_without_improvement")
        if stale is None and meta.get("best_epoch"):
            stale = epoch - int(meta["best_epoch"])
        if stale is not None and int(stale) >= patience:
            latest["early_stopped"] = True
            return latest
    return None


# ------------------------------------------------------------------ progress.json

def progress_uri(run_dir_uri: str) -> str:
    """``<run_dir>/progress.json``."""
    return storage.join(run_dir_uri, PROGRESS_FILE)


def read_progress(run_dir_uri: str) -> Optional[dict]:
    """The run's progress.json, or None when it has none; a corrupt file raises RaytimmError naming it."""
    uri = progress_uri(run_dir_uri)
    if not storage.exists(uri):
        return None
    try:
        data = json.loads(storage.read_bytes(uri))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RaytimmError(f"{uri} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RaytimmError(f"{uri} must hold a JSON object, got {type(data).__name__}")
    return data


def _finite(v: Any) -> Any:
    """JSON without NaN/Infinity (browsers' JSON.parse refuses them): non-finite numbers become null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Mapping):
        return {str(k): _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def write_progress(run_dir_uri: str, progress: Mapping) -> str:
    """Write progress.json atomically (local temp + rename; one PUT in a bucket); returns its URI."""
    text = json.dumps(_finite(dict(progress)), indent=2, allow_nan=False, default=str)
    return storage.write_text(progress_uri(run_dir_uri), text + "\n")


def _numbers(m: Optional[Mapping]) -> dict:
    out = {}
    for k, v in (m or {}).items():
        if isinstance(v, bool):
            continue
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            continue
    return out


class RunFolder:
    """Publishes a run's checkpoints: moves `latest`/`best` and rewrites progress.json.

    One instance per process that publishes (the local reporter, the Ray Train controller's
    callback, the driver at start and end); each picks up the folder's state (best pointer,
    progress history) the first time it needs it, so a restarted controller or a resumed run
    continues where the last one stopped.
    """

    def __init__(self, run_dir_uri: str, *, run_name: str, metric: str, mode: str, epochs: int,
                 mlflow_run_id: Optional[str] = None):
        self.run_dir = run_dir_uri
        self.run_name = run_name
        self.metric = metric
        self.mode = mode
        self.epochs = int(epochs)
        self.mlflow_run_id = mlflow_run_id
        self._best: Optional[dict] = None  # {"checkpoint", "metrics"} of the best pointer
        self._progress: Optional[dict] = None
        self.latest_checkpoint: Optional[str] = None

    # -- state, loaded once
    def _load(self) -> dict:
        if self._progress is None:
            old = read_progress(self.run_dir) or {}
            best = read_pointer(self.run_dir, "best")
            self._best = {"checkpoint": best["checkpoint"], "metrics": _numbers(best.get("metrics"))} if best else None
            latest = read_pointer(self.run_dir, "latest")
            self.latest_checkpoint = latest["checkpoint"] if latest else None
            history = [h for h in old.get("history") or [] if isinstance(h, dict) and "epoch" in h]
            self._progress = {
                "format_version": PROGRESS_VERSION, "run_name": self.run_name, "run_dir": self.run_dir,
                "status": "running", "epoch": int(history[-1]["epoch"]) if history else 0, "epochs": self.epochs,
                "progress": 0.0, "metrics": history[-1] if history else {}, "history": history,
                "best_checkpoint": None, "best_metrics": {}, "best_epoch": None, "latest_checkpoint": None,
                "mlflow_run_id": self.mlflow_run_id or old.get("mlflow_run_id"), "message": None,
                "started_at": old.get("started_at") or _now(), "updated_at": None, "finished_at": None,
            }
        return self._progress

    def reload(self) -> None:
        """Forget what this instance read: another process (Ray's controller) has written since."""
        self._progress, self._best, self.latest_checkpoint = None, None, None

    @property
    def best(self) -> Optional[dict]:
        """{"checkpoint", "metrics"} the `best` pointer names (as this process last wrote or read it)."""
        self._load()
        return self._best

    @property
    def history(self) -> list[dict]:
        """One metrics dict per finished epoch, oldest first."""
        return list(self._load()["history"])

    def _write(self) -> None:
        p = self._load()
        best = self._best or {}
        p.update(epochs=self.epochs, best_checkpoint=best.get("checkpoint"), best_metrics=best.get("metrics") or {},
                 best_epoch=int(best["metrics"]["epoch"]) if "epoch" in (best.get("metrics") or {}) else None,
                 latest_checkpoint=self.latest_checkpoint, updated_at=_now())
        if self.mlflow_run_id:
            p["mlflow_run_id"] = self.mlflow_run_id
        done = p["status"] in ("finished", "stopped_early")
        p["progress"] = 1.0 if done else min(1.0, max(0.0, p["epoch"] / self.epochs)) if self.epochs else 0.0
        write_progress(self.run_dir, p)

    # -- events
    def start(self) -> None:
        """The run (re)starts: status running, earlier epochs' history kept."""
        p = self._load()
        p.update(status="running", message=None, finished_at=None)
        self._write()

    def checkpoint_saved(self, checkpoint_uri: str, metrics: Mapping) -> bool:
        """A complete checkpoint for ``metrics["epoch"]`` is in place: move the pointers, record the
        epoch in progress.json. Returns whether it is now the best."""
        from raytimm.checkpoint import write_best_pointer, write_latest_pointer

        m = _numbers(metrics)
        epoch = int(m["epoch"])
        p = self._load()
        write_latest_pointer(self.run_dir, checkpoint_uri, m)
        self.latest_checkpoint = checkpoint_uri
        is_best = is_better(m, self._best["metrics"] if self._best else None, metric=self.metric, mode=self.mode)
        if is_best:
            write_best_pointer(self.run_dir, checkpoint_uri, m)
            self._best = {"checkpoint": checkpoint_uri, "metrics": m}
        # An epoch trained again after a restart replaces its earlier entry (and any after it).
        p["history"] = [h for h in p["history"] if int(h["epoch"]) < epoch] + [m]
        p.update(status="running", epoch=epoch, metrics=m, message=None, finished_at=None)
        self._write()
        return is_best

    def set_best(self, checkpoint_uri: str, metrics: Mapping) -> None:
        """Point `best` at a checkpoint chosen from the whole folder (the end of a Ray run or a sweep)."""
        from raytimm.checkpoint import write_best_pointer

        self._load()
        write_best_pointer(self.run_dir, checkpoint_uri, _numbers(metrics))
        self._best = {"checkpoint": checkpoint_uri, "metrics": _numbers(metrics)}

    def set_latest(self, checkpoint_uri: str, metrics: Mapping) -> None:
        """Point `latest` at a checkpoint found in the folder (a sweep settling a stopped trial)."""
        from raytimm.checkpoint import write_latest_pointer

        self._load()
        write_latest_pointer(self.run_dir, checkpoint_uri, _numbers(metrics))
        self.latest_checkpoint = checkpoint_uri

    def finish(self, status: str, message: Optional[str] = None) -> None:
        """The run ended: ``finished``, ``stopped_early`` or ``failed`` (with the error's one line)."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        p = self._load()
        p.update(status=status, message=message, finished_at=_now())
        self._write()


def format_progress(p: Mapping) -> str:
    """A few lines for a terminal (``raytimm status``): state, epoch, latest and best metrics, checkpoints."""
    def metrics_line(m: Optional[Mapping]) -> str:
        keys = [k for k in ("val/top1", "val/top5", "val/balanced_acc", "val/mAP", "val/f1_micro", "val/f1_macro",
                            "val/loss", "train/loss", "train/top1") if k in (m or {})]
        return "  ".join(f"{k} {m[k]:.4g}" if isinstance(m[k], (int, float)) else f"{k} -" for k in keys) or "-"

    epochs = p.get("epochs") or 0
    lines = [f"run {p.get('run_name')}: {p.get('status')}, epoch {p.get('epoch', 0)}/{epochs} "
             f"({100.0 * float(p.get('progress') or 0.0):.0f}%)"]
    if p.get("message"):
        lines.append(f"  error:   {p['message']}")
    if p.get("metrics"):
        lines.append(f"  latest:  {metrics_line(p['metrics'])}")
    if p.get("best_checkpoint"):
        lines.append(f"  best:    epoch {p.get('best_epoch')}  {metrics_line(p.get('best_metrics'))}")
        lines.append(f"           {p['best_checkpoint']}")
    if p.get("mlflow_run_id"):
        lines.append(f"  mlflow:  run {p['mlflow_run_id']}")
    times = [f"{k} {p[k + '_at']}" for k in ("started", "updated", "finished") if p.get(k + "_at")]
    if times:
        lines.append("  " + ", ".join(times))
    return "\n".join(lines)


def error_line(exc: BaseException) -> str:
    """The first line of an error, as progress.json's ``message`` and the CLI's last line show it."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:1000]


# ------------------------------------------------------------------ the one-process reporter

class LocalReporter:
    """``report(metrics, checkpoint_dir)`` for ``engine.fit`` without Ray: the run folder writer.

    Rank 0's checkpoint folder is persisted to ``<run_dir>/checkpoint_NNNNNN`` (complete before any
    pointer moves), then the pointers and progress.json follow, then retention prunes. Other ranks
    (a torchrun group) report no folder and write nothing.
    """

    def __init__(self, *, storage_path: str, run_name: str, metric: str, mode: str, num_to_keep: int, epochs: int):
        self.run_dir = run_dir(storage_path, run_name)
        self.metric, self.mode, self.num_to_keep = metric, mode, num_to_keep
        self.folder = RunFolder(self.run_dir, run_name=run_name, metric=metric, mode=mode, epochs=epochs)

    @classmethod
    def from_config(cls, cfg) -> "LocalReporter":
        """The reporter for ``cfg``'s storage.path, run.name (default ``<model>-<time>``) and checkpoint settings."""
        return cls(storage_path=cfg.storage.path, run_name=cfg.run.name or default_run_name(cfg.model.name),
                   metric=cfg.checkpoint.metric, mode=cfg.checkpoint.mode, num_to_keep=cfg.checkpoint.num_to_keep,
                   epochs=cfg.train.epochs)

    def __call__(self, metrics: dict, checkpoint_dir: Optional[str]) -> None:
        if checkpoint_dir is None:
            return
        dest = persist_checkpoint(checkpoint_dir, storage.join(self.run_dir, checkpoint_dir_name(metrics["epoch"])),
                                  move=True)
        self.folder.checkpoint_saved(dest, metrics)
        known = {int(h["epoch"]): h for h in self.folder.history}
        prune(self.run_dir, metric=self.metric, mode=self.mode, num_to_keep=self.num_to_keep, known=known)

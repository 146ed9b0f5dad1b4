"""Checkpoint folder format, save/load, `best`/`latest` pointers and the platform's legacy `.pt`.

A checkpoint is a folder::

    model.safetensors   weights only (EMA weights when EMA is on); read without unpickling
    meta.json           model_name, num_classes, class_names, data_config, epoch, metrics,
                        config (secrets scrubbed), versions, format_version
    train_state.pt      optimizer/scheduler/scaler/EMA/RNG state, for resuming only

A run or tune folder holds a small JSON ``best`` (and ``latest``) pointer file naming a checkpoint,
written only once that checkpoint is complete. This module owns the pointer's format; when a
pointer moves, and which checkpoint is best, is the run folder's policy (``runs.py``). Every path here may be local, ``file://``,
``s3://`` or ``r2://``; remote access goes through :mod:`raytimm.storage`.

Serving never unpickles: ``meta.json`` is JSON, ``model.safetensors`` is safetensors, and the two
``.pt`` readers use ``torch.load(weights_only=True)``, which refuses arbitrary globals.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from raytimm import storage
from raytimm.errors import CheckpointError, CheckpointNotFound, StorageError
from raytimm.secrets import scrub_secrets

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
TRAIN_STATE_FILE = "train_state.pt"
ONNX_FILE = "model.onnx"  # an ONNX export folder (raytimm.export) has this instead of model.safetensors
BEST_POINTER = "best"
LATEST_POINTER = "latest"
# Run folder -> tune folder -> trial run folder -> checkpoint is the deepest chain we produce.
MAX_POINTER_DEPTH = 3


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """A concrete checkpoint: ``kind`` is ``"folder"`` (safetensors + meta), ``"onnx"`` (an export folder:
    model.onnx + meta.json) or ``"legacy_pt"``."""

    kind: str
    uri: str

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:
        return self.uri


# ----------------------------------------------------------------------------- URI helpers
# Parsing, remote I/O and atomic writes are raytimm.storage's; these adapt them to checkpoint errors
# (CheckpointNotFound for a missing file) and keep relative local paths relative.

def is_remote_uri(uri: str) -> bool:
    """True for s3:// and r2:// URIs; raises CheckpointError for URIs storage cannot read."""
    try:
        return storage.is_remote(uri)
    except StorageError as e:
        raise CheckpointError(str(e)) from None


def _local_path(uri: str | os.PathLike) -> Path:
    """Local path for a plain path or file:// URI."""
    return Path(storage.local_path(uri))


def join_uri(base: str, name: str) -> str:
    """Join a child name onto a local path or bucket URI."""
    base = os.fspath(base)
    if is_remote_uri(base):
        return storage.join(base, name)
    return str(_local_path(base) / name)


def _exists(uri: str) -> bool:
    """Whether a file exists at ``uri`` (local or remote); storage failures raise StorageError."""
    if is_remote_uri(uri):
        return storage.exists(uri)
    return _local_path(uri).is_file()


def _read_bytes(uri: str) -> bytes:
    """Read a whole file; CheckpointNotFound when it is missing."""
    if is_remote_uri(uri):
        if not _exists(uri):
            raise CheckpointNotFound(f"checkpoint file not found: {uri}")
        return storage.read_bytes(uri)
    path = _local_path(uri)
    if not path.is_file():
        raise CheckpointNotFound(f"checkpoint file not found: {path}")
    return storage.read_bytes(str(path))  # an unreadable file is a StorageError naming it, not "missing"


class _LocalCopy:
    """Context manager giving a local path for ``uri``; remote files are downloaded to a temp dir."""

    def __init__(self, uri: str):
        self.uri = uri
        self._tmp: str | None = None

    def __enter__(self) -> Path:
        if not is_remote_uri(self.uri):
            path = _local_path(self.uri)
            if not path.is_file():
                raise CheckpointNotFound(f"checkpoint file not found: {path}")
            return path
        if not _exists(self.uri):
            raise CheckpointNotFound(f"checkpoint file not found: {self.uri}")
        self._tmp = tempfile.mkdtemp(prefix="raytimm-ckpt-")
        local = Path(self._tmp) / self.uri.rstrip("/").rsplit("/", 1)[-1]
        storage.download(self.uri, str(local))
        return local

    def __exit__(self, *exc) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- meta helpers

def _json_default(obj: Any) -> Any:
    """Make numpy/torch scalars, paths, tuples and sets JSON-able."""
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"meta.json value of type {type(obj).__name__} is not JSON serialisable")


def library_versions() -> dict:
    """Versions of raytimm, timm and torch, recorded in every meta.json."""
    import timm
    import torch

    import raytimm
    return {"raytimm": raytimm.__version__, "timm": timm.__version__, "torch": torch.__version__}


def _prepare_state_for_safetensors(model_state: Mapping[str, Any]) -> dict:
    """Detach to CPU, make contiguous, and clone tensors that share storage (safetensors refuses them)."""
    import torch

    out: dict = {}
    seen_storage: set[int] = set()
    for name, tensor in model_state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"model_state[{name!r}] is a {type(tensor).__name__}, not a tensor")
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen_storage and t.numel() > 0:
            # Tied weights (e.g. embeddings/heads) or views: store an independent copy of each name.
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen_storage.add(ptr)
        out[name] = t
    return out


# ----------------------------------------------------------------------------- save

def save_checkpoint(dirpath: str | os.PathLike, *, model_state: Mapping[str, Any], meta: Mapping[str, Any],
                    train_state: Mapping[str, Any] | None = None) -> None:
    """Write a checkpoint folder: model.safetensors, train_state.pt (optional), then meta.json last."""
    import safetensors.torch
    import torch

    meta = dict(meta)
    meta.setdefault("format_version", FORMAT_VERSION)
    meta.setdefault("versions", library_versions())
    if "config" in meta and meta["config"] is not None:
        meta["config"] = scrub_secrets(meta["config"])
    meta_bytes = json.dumps(meta, indent=2, sort_keys=True, default=_json_default).encode()

    dirpath = os.fspath(dirpath)
    remote = is_remote_uri(dirpath)
    local_dir = Path(tempfile.mkdtemp(prefix="raytimm-save-")) if remote else _local_path(dirpath)
    local_dir.mkdir(parents=True, exist_ok=True)
    try:
        tensors = _prepare_state_for_safetensors(model_state)
        # save_file writes directly; write to a temp name in the same folder and rename.
        tmp_model = local_dir / f".{MODEL_FILE}.tmp"
        safetensors.torch.save_file(tensors, str(tmp_model), metadata={"format": "pt"})
        os.replace(tmp_model, local_dir / MODEL_FILE)
        if train_state is not None:
            tmp_state = local_dir / f".{TRAIN_STATE_FILE}.tmp"
            torch.save(dict(train_state), tmp_state)
            os.replace(tmp_state, local_dir / TRAIN_STATE_FILE)
        # meta.json last: its presence (with the model file) is what makes the checkpoint complete.
        storage.write_bytes(str(local_dir / META_FILE), meta_bytes)  # temp + fsync + rename
        if remote:
            # One file at a time, in this order, so meta.json lands last remotely too.
            for name in (MODEL_FILE, TRAIN_STATE_FILE, META_FILE):
                if (local_dir / name).exists():
                    storage.upload(str(local_dir / name), join_uri(dirpath, name))
    finally:
        if remote:
            shutil.rmtree(local_dir, ignore_errors=True)


# ----------------------------------------------------------------------------- load

def load_meta(uri: str | os.PathLike) -> dict:
    """Read meta.json of a checkpoint folder (pure JSON, nothing unpickled)."""
    meta_uri = join_uri(os.fspath(uri), META_FILE)
    raw = _read_bytes(meta_uri)
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_uri} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_uri} must hold a JSON object, got {type(meta).__name__}")
    return meta


def load_model_state(uri: str | os.PathLike) -> dict:
    """Read model.safetensors of a checkpoint folder into CPU tensors (never unpickles)."""
    import safetensors.torch

    model_uri = join_uri(os.fspath(uri), MODEL_FILE)
    with _LocalCopy(model_uri) as path:
        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError
            raise CheckpointError(f"{model_uri} is not a valid safetensors file: {e}") from e


def _numpy_safe_globals() -> list:
    """numpy array reconstruction helpers: data only, no code, needed for numpy RNG state."""
    try:
        import numpy as np
        core = getattr(np, "_core", None) or np.core
        return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    except Exception:  # noqa: BLE001 - numpy layout differences: fall back to torch's defaults
        return []


def _unpickling_reason(err: Exception) -> str:
    """The informative line of torch's long weights_only error (which global it refused)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(err).splitlines()]
    for ln in lines:
        if "GLOBAL" in ln or "Unsupported" in ln:
            return ln.split(". Please")[0].rstrip(".")
    return next((ln for ln in lines if ln), type(err).__name__)


def _torch_load_weights_only(path: Path, uri: str, what: str) -> Any:
    """torch.load with weights_only=True; a planted pickle payload fails as CheckpointError."""
    import torch

    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load {what} {uri}: it holds objects that are not plain "
                              f"tensors/containers ({_unpickling_reason(e)})") from e
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"cannot read {what} {uri}: {str(e).strip().splitlines()[0] if str(e) else e!r}") from e


def load_train_state(uri: str | os.PathLike) -> dict:
    """Read train_state.pt of a checkpoint folder with torch.load(weights_only=True)."""
    state_uri = join_uri(os.fspath(uri), TRAIN_STATE_FILE)
    with _LocalCopy(state_uri) as path:
        state = _torch_load_weights_only(path, state_uri, "train state")
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_uri} must hold a dict, got {type(state).__name__}")
    return state


def _strip_prefixes(state: Mapping[str, Any]) -> dict:
    """Drop DDP `module.` and torch.compile `_orig_mod.` prefixes from every key."""
    out = {}
    for key, value in state.items():
        k = str(key)
        changed = True
        while changed:
            changed = False
            for prefix in ("module.", "_orig_mod."):
                if k.startswith(prefix):
                    k, changed = k[len(prefix):], True
        out[k] = value
    return out


def load_legacy_pt(uri: str | os.PathLike) -> dict:
    """Load the platform's legacy `.pt` (weights_only=True) and return a clean state dict."""
    import torch

    uri = os.fspath(uri)
    with _LocalCopy(uri) as path:
        obj = _torch_load_weights_only(path, uri, "legacy checkpoint")
    if isinstance(obj, Mapping):
        for key in ("model_state_dict", "state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return _strip_prefixes(inner)
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return _strip_prefixes(obj)
    raise CheckpointError(f"{uri} is not a model checkpoint: expected a dict with 'model_state_dict' "
                          "(or 'state_dict'), or a bare state dict of tensors")


# ----------------------------------------------------------------------------- pointers

def is_complete(uri: str | os.PathLike) -> bool:
    """A checkpoint folder is complete when both model.safetensors and meta.json exist."""
    uri = os.fspath(uri)
    return _exists(join_uri(uri, MODEL_FILE)) and _exists(join_uri(uri, META_FILE))


def _relative_to(run_dir: str, checkpoint: str) -> str:
    """Checkpoint path relative to the run folder when it lies inside it, else the full URI/path."""
    if is_remote_uri(run_dir) != is_remote_uri(checkpoint):
        return checkpoint
    if is_remote_uri(run_dir):
        base = run_dir.rstrip("/") + "/"
        return checkpoint[len(base):].rstrip("/") if checkpoint.startswith(base) else checkpoint
    run_path = _local_path(run_dir).resolve()
    ckpt_path = _local_path(checkpoint).resolve()
    try:
        return ckpt_path.relative_to(run_path).as_posix()
    except ValueError:
        return str(ckpt_path)


def _write_pointer(run_dir_uri: str, name: str, checkpoint_uri: str, metrics: Mapping | None) -> str:
    """Write `<run_dir>/<name>` naming a complete checkpoint; returns the pointer's URI."""
    run_dir_uri, checkpoint_uri = os.fspath(run_dir_uri), os.fspath(checkpoint_uri)
    if not is_complete(checkpoint_uri):
        raise CheckpointError(f"not writing the {name!r} pointer in {run_dir_uri}: checkpoint {checkpoint_uri} "
                              f"is incomplete (needs {MODEL_FILE} and {META_FILE})")
    payload = {
        "checkpoint": _relative_to(run_dir_uri, checkpoint_uri),
        "metrics": dict(metrics or {}),
        "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    pointer_uri = join_uri(run_dir_uri, name)
    # Atomic locally (temp + rename); a single PUT, atomic by nature, remotely.
    storage.write_bytes(pointer_uri, json.dumps(payload, indent=2, default=_json_default).encode())
    return pointer_uri


def write_best_pointer(run_dir_uri: str, checkpoint_uri: str, metrics: Mapping | None = None) -> str:
    """Point `<run_dir>/best` at a complete checkpoint (atomic replace)."""
    return _write_pointer(run_dir_uri, BEST_POINTER, checkpoint_uri, metrics)


def write_latest_pointer(run_dir_uri: str, checkpoint_uri: str, metrics: Mapping | None = None) -> str:
    """Point `<run_dir>/latest` at a complete checkpoint (atomic replace)."""
    return _write_pointer(run_dir_uri, LATEST_POINTER, checkpoint_uri, metrics)


def read_pointer_info(run_dir_uri: str, name: str = BEST_POINTER) -> dict | None:
    """The parsed pointer file, with "checkpoint" made absolute; None when there is no pointer."""
    run_dir_uri = os.fspath(run_dir_uri)
    pointer_uri = join_uri(run_dir_uri, name)
    if not is_remote_uri(run_dir_uri) and _local_path(pointer_uri).is_dir():
        # Tolerate a `best` symlink/folder that *is* the checkpoint.
        return {"checkpoint": str(_local_path(pointer_uri)), "metrics": {}}
    if not _exists(pointer_uri):
        return None
    raw = _read_bytes(pointer_uri).decode("utf-8", errors="replace").strip()
    try:
        info = json.loads(raw)
    except json.JSONDecodeError:
        if not raw or any(ord(c) < 32 or c == "\ufffd" for c in raw):
            raise CheckpointError(f"pointer {pointer_uri} is corrupt: neither JSON nor a checkpoint path") from None
        info = {"checkpoint": raw}  # a plain-text pointer holding just the path
    if not isinstance(info, dict) or not isinstance(info.get("checkpoint"), str) or not info["checkpoint"]:
        raise CheckpointError(f"pointer {pointer_uri} does not name a checkpoint")
    target = info["checkpoint"]
    if "://" not in target and not os.path.isabs(target):
        if ".." in Path(target).parts:
            raise CheckpointError(f"pointer {pointer_uri} escapes its run folder: {target!r}")
        target = join_uri(run_dir_uri, target)
    info["checkpoint"] = target
    return info


def read_pointer(run_dir_uri: str, name: str = BEST_POINTER) -> str | None:
    """The checkpoint URI a `best`/`latest` pointer names (absolute), or None."""
    info = read_pointer_info(run_dir_uri, name)
    return info["checkpoint"] if info else None


# ----------------------------------------------------------------------------- resolve

def _is_local_dir(uri: str) -> bool:
    return not is_remote_uri(uri) and _local_path(uri).is_dir()


def resolve_checkpoint(uri: str | os.PathLike, *, _depth: int = 0) -> ResolvedCheckpoint:
    """Resolve a checkpoint folder, a run/tune folder (via `best`) or a legacy `.pt` to a concrete checkpoint."""
    uri = os.fspath(uri)
    if not uri:
        raise CheckpointNotFound("empty checkpoint URI")
    remote = is_remote_uri(uri)
    uri = uri.rstrip("/") if remote else str(_local_path(uri))

    if uri.endswith((".pt", ".pth", ".bin")) and (remote or not _local_path(uri).is_dir()):
        if not _exists(uri):
            raise CheckpointNotFound(f"checkpoint not found: {uri}")
        return ResolvedCheckpoint("legacy_pt", uri)
    # A file inside a checkpoint folder (meta.json / model.safetensors) means its folder.
    if uri.endswith(("/" + META_FILE, "/" + MODEL_FILE, "/" + ONNX_FILE)):
        return resolve_checkpoint(uri.rsplit("/", 1)[0], _depth=_depth)

    if not remote and not _local_path(uri).exists():
        raise CheckpointNotFound(f"checkpoint not found: {uri}")
    if not remote and _local_path(uri).is_file():
        raise CheckpointError(f"{uri} is a file but not a legacy .pt checkpoint; "
                              "give a checkpoint folder, a run folder or a .pt file")

    if _exists(join_uri(uri, META_FILE)):
        if not _exists(join_uri(uri, MODEL_FILE)) and _exists(join_uri(uri, ONNX_FILE)):
            return ResolvedCheckpoint("onnx", uri)
        if not _exists(join_uri(uri, MODEL_FILE)):
            raise CheckpointError(f"checkpoint {uri} is incomplete: {MODEL_FILE} is missing")
        return ResolvedCheckpoint("folder", uri)

    target = read_pointer(uri, BEST_POINTER)
    if target is not None:
        if _depth >= MAX_POINTER_DEPTH:
            raise CheckpointError(f"too many nested 'best' pointers starting below {uri}")
        try:
            return resolve_checkpoint(target, _depth=_depth + 1)
        except CheckpointNotFound as e:
            raise CheckpointNotFound(f"'best' pointer in {uri} names a missing checkpoint: {target}") from e

    if remote:
        raise CheckpointNotFound(f"checkpoint not found: {uri} (no {META_FILE}, no '{BEST_POINTER}' pointer, "
                                 "not a .pt file)")
    raise CheckpointError(f"{uri} is not a checkpoint: it has neither {META_FILE} nor a "
                          f"'{BEST_POINTER}' pointer (give a checkpoint folder, a run folder or a .pt file)")

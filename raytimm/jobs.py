"""The training API's bookkeeping, without Ray: request -> run config, the job registry, the status view.

The HTTP side (raytimm/serve/training.py) submits and watches Ray jobs; this module decides what a
request may ask for, what the job runs, where its records live and what the platform is told.

- ``prepare``: the platform's TrainingRequest JSON, checked strictly (unknown fields, wrong JSON types,
  ``framework`` other than ``timm`` -> 422 naming the field; ``dataset_path``/``checkpoint_path``
  outside the allowed prefixes -> 403, before anything is read), mapped onto a Config with
  ``platform_request.request_to_config`` (the same mapping as ``raytimm train --request``).
- ``entrypoint``: the job's command line, built only from server values (its Python, a server-made
  config file URI); nothing from the request ever reaches a shell.
- ``JobRegistry``: ``<runs storage>/.training-api/`` holds one JSON record per training job (its request
  and Ray submission ids) and the config files jobs read. It lives with the runs, so a restarted
  server, or another ingress replica, knows every job (Ray's own job list is lost with its cluster).
- ``job_view``: the answer of ``GET /training/{id}``: the Ray job's state, and the run's progress.json.
"""
from __future__ import annotations

import datetime as _dt
import json
import re
import shlex
import uuid
from typing import Any, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from raytimm import runs, storage
from raytimm.config import Config, config_from_dict, config_to_dict
from raytimm.errors import ConfigError
from raytimm.platform_request import request_to_config
from raytimm.serve.http import HTTPError, check_pretrained_name
from raytimm.serve.paths import check_checkpoint_path, check_resolved_path
from raytimm.serve.settings import config_error

REGISTRY_DIR = ".training-api"  # under the runs storage; run names from the API are always job_<id>
ACTIVE = ("PENDING", "RUNNING")
STATES = ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_PATH_FIELDS = ("dataset_path", "checkpoint_path")


def _check_id(value: Any, *, names: bool) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError("expected an integer or a string")
    if isinstance(value, int):
        if not 0 <= value < 10 ** 18:
            raise ValueError("expected a non-negative integer below 10**18")
        return value
    if names and not _ID_RE.fullmatch(value):
        raise ValueError("expected 1-64 letters, digits, '_' or '-', starting with a letter or digit")
    if not names and (not value or len(value) > 128 or any(ord(c) < 32 for c in value)):
        raise ValueError("expected 1-128 printable characters")
    return value


class TrainingRequest(BaseModel):
    """The platform's TrainingRequest, with JSON types checked strictly (the fields `--request` maps)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    training_job_id: Any = Field(description="The platform's job id; the run is job_<id>.")
    project_id: Any = Field(description="The platform's project id; the MLflow experiment is project_<id>.")
    framework: str = Field("timm", description="Must be timm.")
    model_name: str = Field(min_length=1, max_length=200, description="timm model name.")
    num_classes: Optional[int] = Field(None, ge=1, description="Number of classes (default: the dataset's).")
    dataset_path: str = Field(min_length=1, max_length=2000, description="ImageFolder or DICE export, local or bucket.")
    dataset_format: Optional[str] = Field(None, max_length=20, description="imagefolder or dice.")
    epochs: Optional[int] = Field(None, ge=1, le=100_000, description="Epochs to train.")
    batch_size: Optional[int] = Field(None, ge=1, le=1_000_000, description="Batch size per worker.")
    learning_rate: Optional[float] = Field(None, gt=0, description="Learning rate.")
    checkpoint_path: Optional[str] = Field(None, max_length=2000, description="Checkpoint to fine-tune from.")
    img_size: Optional[int] = Field(None, ge=8, le=4096, description="Input size in pixels.")

    @field_validator("training_job_id", mode="before")
    @classmethod
    def _job_id(cls, v):
        return _check_id(v, names=True)

    @field_validator("project_id", mode="before")
    @classmethod
    def _project_id(cls, v):
        return _check_id(v, names=False)

    @field_validator("framework")
    @classmethod
    def _framework(cls, v):
        if v != "timm":
            raise ValueError("raytimm trains 'timm' models only")
        return v


def job_key(training_job_id: Any) -> str:
    """The registry key (and run name suffix) of a training job id: 7 and "7" are the same job."""
    return str(training_job_id)


def run_name(training_job_id: Any) -> str:
    """``job_<id>``: the run folder (and MLflow run) name, as ``raytimm train --request`` names it."""
    return f"job_{job_key(training_job_id)}"


def check_job_id(text: str) -> str:
    """A path's ``{training_job_id}``: 404 unless it could name a job (nothing else reaches storage)."""
    if not _ID_RE.fullmatch(text or ""):
        raise HTTPError(404, f"no training job {text[:70]!r}")
    return text


def parse_request(body: Any) -> dict:
    """The validated request as a plain dict (unset optional fields left out); 422 naming the field."""
    if not isinstance(body, dict):
        raise HTTPError(422, "the body must be a JSON object (the TrainingRequest)")
    try:
        req = TrainingRequest.model_validate(body)
    except ValidationError as e:
        detail = str(config_error(e, TrainingRequest, lambda n: n, source="request"))
        raise HTTPError(422, detail.replace("Value error, ", "")) from None
    return req.model_dump(exclude_none=True)


def check_data_paths(req: Mapping, allow_data: list) -> None:
    """403 unless dataset_path and checkpoint_path lie under ``allow_data`` (syntax first, then symlinks)."""
    for name in _PATH_FIELDS:
        if req.get(name) is None:
            continue
        uri = check_checkpoint_path(req[name], allow_data, field=name)
        # Only now touch the filesystem (lstat, no reads): a symlink must not lead outside.
        check_resolved_path(uri, allow_data, what=name)


def prepare(body: Any, *, allow_data: list, runs_storage: str, base: Optional[Mapping] = None) -> tuple[dict, Config]:
    """Request JSON -> (validated request, the run's Config with storage.path = runs_storage)."""
    req = parse_request(body)
    check_data_paths(req, allow_data)
    check_pretrained_name(req["model_name"])  # a typo fails here, not minutes later in the job
    try:
        cfg = request_to_config(req, source="request", base=config_from_dict(dict(base)) if base else None)
        d = config_to_dict(cfg)
        d["storage"]["path"] = runs_storage
        cfg = config_from_dict(d, source="request")
    except ConfigError as e:
        raise HTTPError(422, str(e)) from None
    return req, cfg


def config_yaml(cfg: Config) -> str:
    """The run's config as the YAML file the job reads (``raytimm train --config``)."""
    import yaml

    header = "# Written by raytimm's training API for one Ray job; `raytimm train --config` reads it.\n"
    return header + yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)


def entrypoint(python: str, config_uri: str) -> str:
    """The Ray job's command: the cluster's Python runs ``raytimm train --config <server-made URI>``."""
    return shlex.join([python, "-m", "raytimm.cli", "train", "--config", config_uri])


def submission_id(training_job_id: Any, attempt: int) -> str:
    """Ray's submission id of an attempt: the same for every replica, so two identical starts collide."""
    return f"raytimm-{run_name(training_job_id)}-{int(attempt)}"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _iso(ms: Optional[int]) -> Optional[str]:
    if not ms:
        return None
    return _dt.datetime.fromtimestamp(ms / 1000.0, _dt.timezone.utc).isoformat(timespec="seconds")


class JobRegistry:
    """One JSON record per training job under ``<runs storage>/.training-api/jobs/``, plus job configs."""

    def __init__(self, runs_storage: str):
        self.runs_storage = storage.normalize(runs_storage)
        self.root = storage.join(self.runs_storage, REGISTRY_DIR)

    def _record_uri(self, key: str) -> str:
        return storage.join(self.root, "jobs", f"{key}.json")

    def read(self, training_job_id: Any) -> Optional[dict]:
        """The job's record, or None when the API never started it."""
        uri = self._record_uri(job_key(training_job_id))
        if not storage.exists(uri):
            return None
        try:
            return json.loads(storage.read_bytes(uri))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{uri} is not valid JSON: {e}") from None

    def write(self, record: Mapping) -> str:
        """Store a record (atomic locally; one PUT in a bucket)."""
        record = {**record, "updated_at": _now()}
        return storage.write_text(self._record_uri(job_key(record["training_job_id"])),
                                  json.dumps(record, indent=2, ensure_ascii=False) + "\n")

    def list(self) -> list[dict]:
        """Every record, newest first (by creation)."""
        prefix = storage.join(self.root, "jobs")
        if not storage.exists(prefix):
            return []
        out = []
        for obj in storage.list_files(prefix):
            if obj.key.endswith(".json") and "/" not in obj.key:
                record = self.read(obj.key[:-len(".json")])
                if record:
                    out.append(record)
        return sorted(out, key=lambda r: (r.get("created_at") or "", job_key(r["training_job_id"])), reverse=True)

    def new_config_uri(self) -> str:
        """Where the next job's config file goes: a server-made name, nothing from the request."""
        return storage.join(self.root, "configs", f"{uuid.uuid4().hex}.yaml")

    def new_record(self, req: Mapping) -> dict:
        """A record for a job the API has not seen before."""
        name = run_name(req["training_job_id"])
        return {"training_job_id": req["training_job_id"], "run_name": name,
                "run_dir": runs.run_dir(self.runs_storage, name), "request": dict(req), "epochs": None,
                "created_at": _now(), "attempts": []}


def add_attempt(record: dict, *, ray_job_id: str, config_uri: Optional[str], epochs: int) -> dict:
    """The record with one more Ray job (an attempt already listed is left alone)."""
    if all(a["ray_job_id"] != ray_job_id for a in record["attempts"]):
        record["attempts"].append({"ray_job_id": ray_job_id, "config": config_uri, "submitted_at": _now()})
    record["epochs"] = epochs
    return record


def start_answer(record: Mapping) -> dict:
    """What ``POST /training/start`` answers (the platform's shape)."""
    return {"status": "success", "training_job_id": record["training_job_id"],
            "ray_job_id": record["attempts"][-1]["ray_job_id"], "run_name": record["run_name"]}


def last_log_line(logs: Optional[str]) -> Optional[str]:
    """The last non-empty line of a job's logs (its error, when the run died before writing one)."""
    for line in reversed((logs or "").splitlines()):
        if line.strip():
            return line.strip()[:1000]
    return None


def job_view(record: Mapping, ray_job: Optional[Mapping], progress: Optional[Mapping], *,
             log_line: Optional[str] = None, history: bool = True) -> dict:
    """``GET /training/{id}``: the state from Ray's job (or the run folder when Ray lost it), the rest from
    progress.json. ``ray_job``: {status, message, start_time, end_time} of the latest attempt, or None."""
    p = dict(progress or {})
    status = p.get("status")
    message = None
    if ray_job is not None:
        state = str(ray_job.get("status"))
    elif status in ("finished", "stopped_early"):
        state = "SUCCEEDED"
    elif status == "failed":
        state = "FAILED"
    else:
        state = "FAILED"
        message = (f"Ray does not know job {record['attempts'][-1]['ray_job_id']} (was the cluster restarted?); "
                   f"start it again to resume the run")
    if state == "FAILED" and message is None:
        message = (p.get("message") if status == "failed" else None) or log_line or (ray_job or {}).get("message")
    epochs = p.get("epochs") or record.get("epochs")
    done = state == "SUCCEEDED"
    progress_value = 1.0 if done and status in ("finished", "stopped_early") else float(p.get("progress") or 0.0)
    finished_at = p.get("finished_at")
    if finished_at is None and state not in ACTIVE:
        finished_at = _iso((ray_job or {}).get("end_time"))
    view = {
        "training_job_id": record["training_job_id"], "ray_job_id": record["attempts"][-1]["ray_job_id"],
        "run_name": record["run_name"], "run_dir": record["run_dir"], "state": state,
        "epoch": int(p.get("epoch") or 0), "epochs": epochs, "progress": progress_value,
        "metrics": p.get("metrics") or {}, "history": p.get("history") or [],
        "best_checkpoint": p.get("best_checkpoint"), "best_metrics": p.get("best_metrics") or {},
        "mlflow_run_id": p.get("mlflow_run_id"), "message": message,
        "started_at": p.get("started_at") or record.get("created_at"), "finished_at": finished_at,
        "attempts": len(record["attempts"]),
    }
    if not history:
        view.pop("history")
    return view

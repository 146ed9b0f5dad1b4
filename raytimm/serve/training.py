"""The training API's routes: the platform's TrainingRequest in, Ray jobs out (off unless ``--training-api``).

    POST /training/start            submit `raytimm train --config <file>` as a Ray job (or answer the live one)
    GET  /training                  the jobs this API knows, newest first
    GET  /training/{id}             state (from Ray's Jobs API) + progress (the run's progress.json)
    POST /training/{id}/stop        stop the Ray job; its checkpoints stay
    GET  /training/{id}/confusion   the best checkpoint's confusion matrix (meta.json), for the page

Jobs go through Ray's ``JobSubmissionClient`` to the cluster's dashboard, with the cluster's auth token;
nothing trains inside a Serve replica. The routes live on an APIRouter that ingress.py includes; the
Ingress replica installs the ``TrainingService`` (one per replica process) and its auth check.
Everything that needs no Ray (validation, records, the status view) is in ``raytimm.jobs``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections import defaultdict
from typing import Any, Callable, Mapping, Optional

from fastapi import APIRouter, Request

from raytimm import jobs, runs, storage
from raytimm.envvars import forwarded_env
from raytimm.errors import RaytimmError
from raytimm.serve.http import HTTPError
from raytimm.serve.paths import check_resolved_path, normalize_prefix

log = logging.getLogger("raytimm.serve")

MAX_JSON_BYTES = 64 * 1024  # a TrainingRequest is a few hundred bytes
RAY_TIMEOUT_S = 30.0  # one Jobs API call; the SDK itself has no timeout
LIST_LIMIT = 200
router = APIRouter()
_installed: dict = {"service": None, "auth": None}


def cluster_dashboard_url() -> Optional[str]:
    """The dashboard URL the cluster records for itself (what ``ray.init`` reports), from inside a replica."""
    from ray._private.services import get_webui_url_from_internal_kv

    url = get_webui_url_from_internal_kv()
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


def ray_auth_headers() -> dict:
    """``Authorization: Bearer <Ray token>`` from Ray's own token lookup (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token), whatever RAY_AUTH_MODE this process has; {} when there is no token."""
    try:
        from ray._raylet import AuthenticationTokenLoader
    except ImportError:  # a Ray without token authentication
        return {}
    return dict(AuthenticationTokenLoader.instance().get_token_for_http_header(ignore_auth_mode=True) or {})


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


class TrainingService:
    """Submits, watches and stops the API's Ray jobs; keeps their records in the runs storage."""

    def __init__(self, *, runs_storage: str, allow_data: list, base_config: Optional[Mapping] = None,
                 dashboard_url: Optional[str] = None, python: str = sys.executable):
        self.registry = jobs.JobRegistry(runs_storage)
        self.allow_data = [normalize_prefix(p) for p in allow_data]
        self.base_config = dict(base_config) if base_config else None
        self.dashboard_url = dashboard_url
        self.python = python
        self._client = None
        self._locks: dict = defaultdict(asyncio.Lock)

    # -- Ray's Jobs API (blocking SDK calls run in threads, bounded in time)

    async def _call(self, fn: Callable, *args, **kwargs):
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args, **kwargs), timeout=RAY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise HTTPError(504, f"Ray's job server at {self.dashboard_url} did not answer within "
                                 f"{RAY_TIMEOUT_S:.0f}s") from None

    def _make_client(self):
        from ray.job_submission import JobSubmissionClient

        if not self.dashboard_url:
            self.dashboard_url = cluster_dashboard_url()
        if not self.dashboard_url:
            raise HTTPError(503, "the Ray cluster records no dashboard (Jobs API): start it with the dashboard, "
                                 "or give --ray-dashboard-url")
        try:
            return JobSubmissionClient(self.dashboard_url, headers=ray_auth_headers())
        except Exception as e:  # noqa: BLE001 - connection, auth and version errors all mean "cannot submit"
            raise HTTPError(503, f"Ray's job server at {self.dashboard_url} is not usable: {_first_line(e)}") from None

    async def client(self):
        """The JobSubmissionClient, made on first use (its constructor checks the connection)."""
        if self._client is None:
            self._client = await self._call(self._make_client)
        return self._client

    async def ray_job(self, submission_id: str) -> Optional[dict]:
        """{status, message, start_time, end_time} of a Ray job, or None when the cluster does not know it."""
        client = await self.client()
        try:
            info = await self._call(client.get_job_info, submission_id)
        except RuntimeError as e:
            if "status code 404" in str(e):
                return None
            raise HTTPError(502, f"Ray's job server at {self.dashboard_url}: {_first_line(e)}") from None
        return _job_dict(info)

    async def _progress(self, record: Mapping) -> Optional[dict]:
        try:
            return await asyncio.to_thread(runs.read_progress, record["run_dir"])
        except RaytimmError as e:  # a bucket hiccup: the state still comes from Ray
            log.warning("reading the progress of %s: %s", record["run_dir"], e)
            return None

    async def _record(self, training_job_id: str) -> dict:
        key = jobs.check_job_id(training_job_id)
        record = await asyncio.to_thread(self.registry.read, key)
        if record is None or not record.get("attempts"):
            raise HTTPError(404, f"no training job {key!r} (start it with POST /training/start)")
        return record

    # -- the routes' work

    async def start(self, body: Any) -> dict:
        """Submit the request as a Ray job, or answer the job already pending/running (or done) for its id."""
        req, cfg = jobs.prepare(body, allow_data=self.allow_data, runs_storage=self.registry.runs_storage,
                                base=self.base_config)
        key = jobs.job_key(req["training_job_id"])
        # One start per id at a time in this replica; across replicas the submission id decides.
        async with self._locks[key]:
            record = await asyncio.to_thread(self.registry.read, key)
            if record and record.get("attempts"):
                latest = await self.ray_job(record["attempts"][-1]["ray_job_id"])
                if latest and latest["status"] in jobs.ACTIVE:
                    if record["request"] != req:
                        raise HTTPError(409, f"training job {key!r} is {latest['status'].lower()} with another "
                                             f"request; stop it first")
                    return jobs.start_answer(record)
                if latest and latest["status"] == "SUCCEEDED":
                    return jobs.start_answer(record)  # complete: nothing to resume
            record = record or self.registry.new_record(req)
            record["request"] = req  # a resume may change the request (e.g. more epochs)
            return await self._submit(record, cfg)

    async def _submit(self, record: dict, cfg) -> dict:
        client = await self.client()
        attempt = len(record["attempts"]) + 1
        for _ in range(10):
            sid = jobs.submission_id(record["training_job_id"], attempt)
            config_uri = self.registry.new_config_uri()
            await asyncio.to_thread(storage.write_text, config_uri, jobs.config_yaml(cfg))
            env = forwarded_env()
            try:
                await self._call(client.submit_job, entrypoint=jobs.entrypoint(self.python, config_uri),
                                 submission_id=sid, runtime_env={"env_vars": env} if env else None,
                                 metadata={"raytimm.training_job_id": jobs.job_key(record["training_job_id"]),
                                           "raytimm.run_name": record["run_name"]})
            except HTTPError:
                raise
            except Exception as e:  # noqa: BLE001 - the id may be taken: by a concurrent start, or an old cluster's job
                existing = await self.ray_job(sid)
                if existing is None:
                    raise HTTPError(502, f"submitting to Ray's job server at {self.dashboard_url} failed: "
                                         f"{_first_line(e)}") from None
                if existing["status"] not in jobs.ACTIVE and existing["status"] != "SUCCEEDED":
                    attempt += 1  # an earlier attempt that ended: take the next number
                    continue
                config_uri = None  # the other start's config is the one that runs
            jobs.add_attempt(record, ray_job_id=sid, config_uri=config_uri, epochs=cfg.train.epochs)
            await asyncio.to_thread(self.registry.write, record)
            # An audit line for every submission (replicas log at WARNING and above).
            log.warning("training job %s: Ray job %s (%s)", record["training_job_id"], sid, record["run_name"])
            return jobs.start_answer(record)
        raise HTTPError(409, f"training job {record['training_job_id']!r}: no free Ray submission id after "
                             f"attempt {attempt}")

    async def status(self, training_job_id: str) -> dict:
        """The job's state and its run's progress."""
        record = await self._record(training_job_id)
        sid = record["attempts"][-1]["ray_job_id"]
        ray_job, progress = await asyncio.gather(self.ray_job(sid), self._progress(record))
        log_line = None
        if ray_job and ray_job["status"] == "FAILED" and (progress or {}).get("status") != "failed":
            client = await self.client()
            try:
                log_line = jobs.last_log_line(await self._call(client.get_job_logs, sid))
            except Exception as e:  # noqa: BLE001 - the logs are a nicety; Ray's own message remains
                log.warning("logs of Ray job %s: %s", sid, _first_line(e))
        return jobs.job_view(record, ray_job, progress, log_line=log_line)

    async def stop(self, training_job_id: str) -> dict:
        """Stop the job's Ray job (idempotent); checkpoints stay in the run folder."""
        record = await self._record(training_job_id)
        sid = record["attempts"][-1]["ray_job_id"]
        client = await self.client()
        ray_job = await self.ray_job(sid)
        stopped = False
        if ray_job and ray_job["status"] in jobs.ACTIVE:
            try:
                stopped = bool(await self._call(client.stop_job, sid))
            except RuntimeError as e:
                raise HTTPError(502, f"stopping Ray job {sid}: {_first_line(e)}") from None
            ray_job = await self.ray_job(sid) or ray_job
        return {"status": "success", "training_job_id": record["training_job_id"], "ray_job_id": sid,
                "stopped": stopped, "state": ray_job["status"] if ray_job else None}

    async def list(self, limit: int = LIST_LIMIT) -> dict:
        """The jobs this API knows, newest first, without their histories."""
        records = [r for r in await asyncio.to_thread(self.registry.list) if r.get("attempts")][:limit]
        known: dict = {}
        if records:
            client = await self.client()
            try:
                known = {j.submission_id: _job_dict(j) for j in await self._call(client.list_jobs)
                         if j.submission_id}
            except RuntimeError as e:
                raise HTTPError(502, f"Ray's job server at {self.dashboard_url}: {_first_line(e)}") from None
        progresses = await asyncio.gather(*(self._progress(r) for r in records))
        return {"jobs": [jobs.job_view(r, known.get(r["attempts"][-1]["ray_job_id"]), p, history=False)
                         for r, p in zip(records, progresses)]}

    async def confusion(self, training_job_id: str) -> dict:
        """The best checkpoint's confusion matrix and class names (read from its meta.json only)."""
        from raytimm import checkpoint as ckpt

        record = await self._record(training_job_id)
        progress = await self._progress(record) or {}
        best = progress.get("best_checkpoint")
        if not best:
            raise HTTPError(404, f"training job {record['training_job_id']!r} has no checkpoint yet")
        # Only files of this job's own run folder are read, whatever progress.json says.
        check_resolved_path(best, [normalize_prefix(record["run_dir"])])
        meta = await asyncio.to_thread(ckpt.load_meta, best)
        return {"training_job_id": record["training_job_id"], "checkpoint": best, "epoch": meta.get("epoch"),
                "class_names": meta.get("class_names") or [], "confusion_matrix": meta.get("confusion_matrix")}


def _job_dict(info) -> dict:
    status = getattr(info.status, "value", info.status)
    return {"status": str(status), "message": info.message, "start_time": info.start_time,
            "end_time": info.end_time}


# ----------------------------------------------------------------------------- routes

def install(service: Optional[TrainingService], auth: Callable[[Request], None]) -> None:
    """Called by each Ingress replica: its service (None = the API is off) and its bearer-token check."""
    _installed.update(service=service, auth=auth)


def _service(request: Request) -> TrainingService:
    auth = _installed["auth"]
    if auth is not None:
        auth(request)
    service = _installed["service"]
    if service is None:
        raise HTTPError(404, "the training API is off: start the server with --training-api")
    return service


async def read_json(request: Request) -> Any:
    """The request body as JSON, read with a size bound (413) before parsing (422)."""
    length = request.headers.get("content-length")
    if length is not None and (not length.strip().isdigit() or int(length) > MAX_JSON_BYTES):
        raise HTTPError(413, f"the body must be a JSON object of at most {MAX_JSON_BYTES // 1024} KiB")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > MAX_JSON_BYTES:
            raise HTTPError(413, f"the body must be a JSON object of at most {MAX_JSON_BYTES // 1024} KiB")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HTTPError(422, f"the body is not valid JSON: {e}") from None


# The body is read by hand (bounded before parsing); the schema is declared for OpenAPI readers.
_START_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": jobs.TrainingRequest.model_json_schema()}}}}


@router.post("/training/start", openapi_extra=_START_BODY)
async def training_start(request: Request):
    """The platform's TrainingRequest -> {status, training_job_id, ray_job_id, run_name}."""
    service = _service(request)
    return await service.start(await read_json(request))


@router.get("/training")
async def training_list(request: Request):
    """{"jobs": [...]}: every job this API started, newest first."""
    return await _service(request).list()


@router.get("/training/{training_job_id}")
async def training_status(training_job_id: str, request: Request):
    """State, epoch/epochs, progress, metrics, history, best checkpoint and metrics, message, times."""
    return await _service(request).status(training_job_id)


@router.post("/training/{training_job_id}/stop")
async def training_stop(training_job_id: str, request: Request):
    """Stop the Ray job; the run's checkpoints stay (a later start resumes it)."""
    return await _service(request).stop(training_job_id)


@router.get("/training/{training_job_id}/confusion")
async def training_confusion(training_job_id: str, request: Request):
    """The best checkpoint's confusion matrix (rows: true class) and class names."""
    return await _service(request).confusion(training_job_id)

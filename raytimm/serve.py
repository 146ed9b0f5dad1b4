"""Ray Serve application: FastAPI ingress + batched, multiplexed model deployment.

    raytimm serve --checkpoint URI                      # run_server(): local Ray (or RAY_ADDRESS), blocks
    serve run raytimm.serve:build_app checkpoint=URI    # typed app builder (ServeArgs)
    serve deploy configs/serve.yaml                     # same builder, autoscaling and resources in YAML

Ingress (``Ingress``): auth, body limits, multipart parsing, image decoding (``data/images.py``),
allowed-prefix checks and checkpoint resolution, error mapping to 4xx JSON ``{"detail": ...}``.
Model (``ModelServer``): the startup checkpoint (hot-swapped via ``user_config`` -> ``reconfigure``),
an LRU of request checkpoints / pretrained models (``@serve.multiplexed``), the eval transform and
``@serve.batch``-ed forward passes.

This is the only module that imports ``ray.serve``. No ``from __future__ import annotations`` here:
Serve inspects the builder's annotation as a real class to validate ``ServeArgs``.
"""
import asyncio
import hmac
import json
import logging
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, field_validator
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from raytimm.config import ServeSection
from raytimm.envvars import API_TOKEN_ENV as TOKEN_ENV
from raytimm.envvars import WEIGHTS_DIR_ENV, forwarded_env
from raytimm.errors import (CheckpointError, CheckpointNotFound, ConfigError, DataError, ImageError,
                            ImageTooLargeError, RaytimmError, StorageError)

if TYPE_CHECKING:
    from raytimm.checkpoint import ResolvedCheckpoint

log = logging.getLogger("raytimm.serve")

APP_NAME = "raytimm"
MAX_FILES = 64
MAX_TOP_K_DIGITS = 9
_DEFAULTS = ServeSection()
_QUIET_LOGGING = {"enable_access_log": False, "log_level": "WARNING"}


class HTTPError(Exception):
    """A client-facing error: status code and a one-line detail."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


class Secret:
    """Holds a token without ever printing it (repr/str are masked)."""

    def __init__(self, value: Optional[str]):
        self._value = value or None

    def get(self) -> Optional[str]:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)" if self._value else "Secret(None)"

    __str__ = __repr__


# ----------------------------------------------------------------------------- pure helpers (tested without Serve)

def error_status(exc: BaseException) -> int:
    """HTTP status for a raytimm error raised while serving a request."""
    if isinstance(exc, HTTPError):
        return exc.status
    if isinstance(exc, ImageTooLargeError):
        return 413
    if isinstance(exc, ImageError):
        return 415
    if isinstance(exc, CheckpointNotFound):
        return 404
    if isinstance(exc, (CheckpointError, ConfigError, DataError)):
        return 422
    if isinstance(exc, StorageError):
        return 502
    return 500


def parse_top_k(raw: Any, default: int = 5) -> int:
    """Parse the top_k form field: a positive integer (422 otherwise); clamping happens per model."""
    if raw is None or (isinstance(raw, str) and raw.strip() == ""):
        return default
    if not isinstance(raw, str):
        raise HTTPError(422, "top_k must be a positive integer, got a file upload")
    text = raw.strip()
    if not re.fullmatch(r"[+-]?\d+", text):
        raise HTTPError(422, f"top_k must be a positive integer, got {text[:20]!r}")
    if not text.startswith("-") and len(text.lstrip("+0")) > MAX_TOP_K_DIGITS:
        return 10 ** MAX_TOP_K_DIGITS  # absurdly large: clamped to the class count later
    value = int(text)
    if value < 1:
        raise HTTPError(422, f"top_k must be >= 1, got {value}")
    return value


def _uri_scheme(path: str) -> str:
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*):", path)
    # "C:" style drive letters are not schemes, but we do not serve Windows paths either.
    return m.group(1).lower() if m else ""


def normalize_prefix(prefix: str) -> str:
    """Canonical form of an allowed prefix (absolute local path or scheme://bucket/key)."""
    from raytimm import storage
    return storage.normalize(prefix).rstrip("/") or "/"


def _is_under(uri: str, prefix: str) -> bool:
    if uri == prefix:
        return True
    return uri.startswith(prefix if prefix.endswith("/") else prefix + "/")


def check_checkpoint_path(path: str, allowed: list) -> str:
    """Normalised checkpoint URI if it lies under an allowed prefix; HTTPError(403) otherwise.

    Purely syntactic: no file or network access happens before the path is accepted.
    """
    from raytimm import storage

    text = path.strip()
    if any(ord(c) < 32 for c in text):
        raise HTTPError(403, "checkpoint_path contains control characters")
    shown = text[:200]
    if re.search(r"(^|[\\/])\.\.([\\/]|$)", text):
        raise HTTPError(403, f"checkpoint_path {shown!r}: '..' is not allowed")
    scheme = _uri_scheme(text)
    if scheme and scheme not in ("s3", "r2"):
        raise HTTPError(403, f"checkpoint_path {shown!r}: scheme '{scheme}:' is not allowed (use s3:// or r2:// "
                             "or an absolute path under an allowed prefix)")
    if not scheme and (not text.startswith("/") or text.startswith("~")):
        raise HTTPError(403, f"checkpoint_path {shown!r}: local paths must be absolute")
    try:
        uri = storage.normalize(text)
    except StorageError as e:
        raise HTTPError(403, f"checkpoint_path {shown!r}: {e}") from None
    for prefix in allowed:
        if _is_under(uri, prefix):
            return uri
    raise HTTPError(403, f"checkpoint_path {shown!r} is not under an allowed prefix")


def check_resolved_path(uri: str, allowed: list) -> None:
    """After resolving pointers/symlinks (file access is fine now), the target must still be allowed."""
    from raytimm import storage
    if storage.is_remote(uri):
        candidates = [uri]
    else:
        candidates = [os.path.realpath(uri)]
        allowed = [os.path.realpath(p) if not storage.is_remote(p) else p for p in allowed]
    if not any(_is_under(c, p) for c in candidates for p in allowed):
        raise HTTPError(403, f"checkpoint {uri} (resolved) is not under an allowed prefix")


def storage_root(checkpoint: Union[str, "ResolvedCheckpoint"]) -> str:
    """Default allowed prefix for a startup checkpoint: the bucket, or locally the run folder's parent.

    A local checkpoint lives at ``<storage.path>/<run>/<checkpoint>``, so its grandparent is the
    storage root; a legacy ``.pt`` file allows its own folder. Takes a URI or an already resolved one.
    """
    from raytimm import checkpoint as ckpt
    from raytimm import storage

    resolved = ckpt.resolve_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
    parsed = storage.parse_uri(resolved.uri)
    if parsed.remote:
        return f"{parsed.scheme}://{parsed.bucket}"
    path = os.path.realpath(parsed.key)
    if resolved.kind == "legacy_pt":
        return os.path.dirname(path)
    return os.path.dirname(os.path.dirname(path)) or "/"


def _read_token() -> Secret:
    return Secret(os.environ.get(TOKEN_ENV))


def _forwarded_env() -> dict:
    return forwarded_env()


# ----------------------------------------------------------------------------- model deployment

def _model_id(kind: str, uri: Optional[str] = None, model_name: Optional[str] = None,
              num_classes: Optional[int] = None) -> str:
    """Multiplexed model id: the checkpoint URI (plus name/classes for a legacy .pt) or pretrained:<name>."""
    if kind == "pretrained":
        return f"pretrained:{model_name}"
    if kind == "legacy_pt":
        return json.dumps({"uri": uri, "model_name": model_name, "num_classes": num_classes}, sort_keys=True)
    return str(uri)


def _load_from_model_id(model_id: str, *, weights_dir: Optional[str], max_pixels: int, device: Optional[str]):
    """Build a Predictor for a multiplexed model id (runs in a worker thread)."""
    from raytimm.predict import Predictor
    if model_id.startswith("pretrained:"):
        return Predictor.pretrained(model_id[len("pretrained:"):], weights_dir=weights_dir, device=device,
                                    max_pixels=max_pixels)
    if model_id.startswith("{"):
        spec = json.loads(model_id)
        return Predictor.from_checkpoint(spec["uri"], model_name=spec["model_name"],
                                         num_classes=spec["num_classes"], device=device, max_pixels=max_pixels)
    return Predictor.from_checkpoint(model_id, device=device, max_pixels=max_pixels)


def _error_payload(exc: BaseException) -> dict:
    status = error_status(exc)
    # Our own errors name the file/URI and never hold secrets; anything else is a bug, not shown.
    known = isinstance(exc, (HTTPError, RaytimmError))
    detail = str(exc) if known else "internal error while running the model"
    return {"error": {"status": status, "detail": detail}}


@serve.deployment(logging_config=_QUIET_LOGGING)
class ModelServer:
    """Holds the served Predictor (hot-swappable) and an LRU of request-selected models; batches forwards."""

    def __init__(self, *, weights_dir: Optional[str] = None, max_models: int = _DEFAULTS.max_models,
                 num_threads: Optional[int] = None, device: Optional[str] = None):
        import torch

        from raytimm.logs import worker_logging_setup
        worker_logging_setup()
        threads = num_threads or _assigned_cpus()
        torch.set_num_threads(max(1, int(threads)))
        self._weights_dir = weights_dir or os.environ.get(WEIGHTS_DIR_ENV)
        self._device = device
        self._max_pixels = _DEFAULTS.max_pixels
        self._predictor = None
        self._spec: Optional[dict] = None
        self._reload_error: Optional[dict] = None
        self._loaded_at: Optional[float] = None
        # Built per instance so the LRU size is a runtime setting (Serve detects it on the instance).
        async def load_model(model_id: str):
            # A plain function, not a bound method: Serve caches its LRU on the function object.
            return await self._load_model(model_id)
        self._get_model = serve.multiplexed(max_num_models_per_replica=int(max_models))(load_model)

    async def _load_model(self, model_id: str):
        return await asyncio.to_thread(_load_from_model_id, model_id, weights_dir=self._weights_dir,
                                       max_pixels=self._max_pixels, device=self._device)

    async def reconfigure(self, config: dict) -> None:
        """Apply user_config: batch settings, and swap in a new checkpoint (old model keeps serving until then)."""
        config = dict(config or {})
        self._infer.set_max_batch_size(int(config.get("max_batch_size", _DEFAULTS.max_batch_size)))
        self._infer.set_batch_wait_timeout_s(float(config.get("batch_wait_ms", _DEFAULTS.batch_wait_ms)) / 1000.0)
        self._max_pixels = int(config.get("max_pixels", self._max_pixels))
        spec = {k: config.get(k) for k in ("checkpoint", "model_name", "num_classes")}
        if not spec["checkpoint"]:
            return
        if spec == self._spec:
            self._reload_error = None  # back to the model being served: an earlier failed reload no longer matters
            return
        from raytimm.predict import Predictor
        start = time.monotonic()
        try:
            # Load fully in a thread first: requests keep using the old predictor meanwhile.
            new = await asyncio.to_thread(Predictor.from_checkpoint, spec["checkpoint"],
                                          model_name=spec["model_name"], num_classes=spec["num_classes"],
                                          device=self._device, max_pixels=self._max_pixels)
        except Exception as exc:  # noqa: BLE001 - any load failure must leave the old model serving
            if self._predictor is None:
                raise  # nothing to fall back to: the replica fails to start, with this error
            self._reload_error = {"checkpoint": spec["checkpoint"], "error": f"{type(exc).__name__}: {exc}",
                                  "time": time.time()}
            log.error("reload of %s failed; still serving %s: %s", spec["checkpoint"], self._predictor.source, exc)
            return
        self._predictor, self._spec = new, spec  # the swap: one reference assignment
        self._reload_error, self._loaded_at = None, time.time()
        log.warning("serving %s (%s, %d classes), loaded in %.1fs", new.source, new.model_name, new.num_classes,
                    time.monotonic() - start)

    def ready(self) -> bool:
        """True once a model is loaded."""
        return self._predictor is not None

    def metadata(self) -> dict:
        """Metadata of the served model plus reload status."""
        if self._predictor is None:
            return {"loaded": False, "reload_error": self._reload_error}
        meta = self._predictor.metadata()
        meta.update(loaded=True, requested_checkpoint=(self._spec or {}).get("checkpoint"),
                    loaded_at=self._loaded_at, reload_error=self._reload_error, replica=_replica_id())
        return meta

    async def predict(self, images: list, top_k: int) -> dict:
        """Top-k for decoded RGB arrays with the served model, or the multiplexed one for this request."""
        try:
            model_id = serve.get_multiplexed_model_id()
            predictor = await self._get_model(model_id) if model_id else self._predictor
            if predictor is None:
                raise HTTPError(503, "no model loaded yet")
            tensors = await asyncio.to_thread(lambda: [predictor.preprocess(a) for a in images])
            k = predictor.clamp_top_k(top_k)
            results = await asyncio.gather(*(self._infer((predictor, t, k)) for t in tensors))
            return {"results": list(results)}
        except Exception as exc:  # noqa: BLE001 - answer with a status, never let Serve turn it into a 500 page
            if error_status(exc) >= 500 and not isinstance(exc, HTTPError):
                log.exception("model call failed")
            return _error_payload(exc)

    @serve.batch(max_batch_size=_DEFAULTS.max_batch_size, batch_wait_timeout_s=_DEFAULTS.batch_wait_ms / 1000.0)
    async def _infer(self, items: list) -> list:
        """One forward per predictor over all queued images (several requests share a batch)."""
        import torch
        out: list = [None] * len(items)
        groups: dict = {}
        for i, (predictor, _, _) in enumerate(items):
            groups.setdefault(id(predictor), []).append(i)
        for idx in groups.values():
            predictor = items[idx[0]][0]
            batch = torch.stack([items[i][1] for i in idx])
            ks = [items[i][2] for i in idx]
            # Off the event loop, so the next batch can queue while this one runs.
            results = await asyncio.to_thread(predictor.predict_tensor_batch, batch, ks)
            for i, r in zip(idx, results):
                out[i] = r
        return out


def _replica_id() -> Optional[str]:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - informational only
        return None


def _assigned_cpus() -> int:
    """CPUs Ray assigned to this replica (torch threads should match), at least 1."""
    try:
        import ray
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    except Exception:  # noqa: BLE001 - outside Ray: one thread per core is torch's default anyway
        cpus = os.cpu_count() or 1
    return max(1, int(round(cpus)))


# ----------------------------------------------------------------------------- ingress

app = FastAPI(title="raytimm", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(HTTPError)
@app.exception_handler(RaytimmError)
async def _client_error(_: Request, exc: Exception):
    # Our own errors name the file/URI and never hold secrets; error_status maps raytimm errors.
    status = error_status(exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)


@app.exception_handler(StarletteHTTPException)
async def _starlette_error(_: Request, exc: StarletteHTTPException):
    return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError):
    return JSONResponse({"detail": "invalid request"}, status_code=422)


@app.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception):
    # A bug, not the client's fault; never a stack trace on the wire.
    log.error("unexpected error: %s: %s", type(exc).__name__, exc)
    return JSONResponse({"detail": "internal error"}, status_code=500)


def _replay(body: bytes):
    """An ASGI receive() that hands Starlette's form parser an already bounded body."""
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
    return receive


# Form helpers must exist before Ingress: @serve.ingress snapshots the class's globals.
def _text_field(form, name: str) -> Optional[str]:
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise HTTPError(422, f"{name} must be a text field")
    return value.strip() or None


def _int_field(form, name: str) -> Optional[int]:
    text = _text_field(form, name)
    if text is None:
        return None
    if not re.fullmatch(r"\d{1,7}", text) or int(text) < 1:
        raise HTTPError(422, f"{name} must be a positive integer, got {text[:20]!r}")
    return int(text)


def _check_pretrained_name(name: str) -> None:
    import timm
    if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,100}", name) or not timm.is_model(name):
        raise HTTPError(422, f"model_name {name[:100]!r} is not a timm model")


@serve.deployment(logging_config=_QUIET_LOGGING)
@serve.ingress(app)
class Ingress:
    """HTTP front: auth, limits, decoding, allowed prefixes; forwards arrays to ModelServer."""

    def __init__(self, model: DeploymentHandle, token: Optional[Secret] = None):
        from raytimm.logs import worker_logging_setup
        worker_logging_setup()
        self._model = model
        token_value = token.get() if isinstance(token, Secret) else None
        self._token = (token_value or os.environ.get(TOKEN_ENV) or "").encode() or None
        self._allow: list = []
        self._max_upload = int(_DEFAULTS.max_upload_mb * 1024 * 1024)
        self._max_pixels = _DEFAULTS.max_pixels

    def reconfigure(self, config: dict) -> None:
        """user_config: allow (prefixes), max_upload_mb, max_pixels."""
        config = dict(config or {})
        self._allow = [normalize_prefix(p) for p in config.get("allow") or []]
        self._max_upload = int(float(config.get("max_upload_mb", _DEFAULTS.max_upload_mb)) * 1024 * 1024)
        self._max_pixels = int(config.get("max_pixels", _DEFAULTS.max_pixels))

    # -- request plumbing

    def _check_auth(self, request: Request) -> None:
        if not self._token:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise HTTPError(401, "missing bearer token (Authorization: Bearer <token>)")
        if not hmac.compare_digest(given.strip().encode(), self._token):
            raise HTTPError(401, "invalid bearer token")

    async def _read_form(self, request: Request):
        """Bounded body read (Content-Length first, then while streaming) and multipart parsing."""
        limit_mb = self._max_upload / (1024 * 1024)
        length = request.headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                raise HTTPError(400, "invalid Content-Length header")
            if int(length) > self._max_upload:
                raise HTTPError(413, f"request body of {int(length):,} bytes exceeds the {limit_mb:g} MiB limit")
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            raise HTTPError(422, "expected a multipart/form-data body with a 'file' field")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > self._max_upload:
                raise HTTPError(413, f"request body exceeds the {limit_mb:g} MiB limit")
            chunks.append(chunk)
        replay = Request(request.scope, _replay(b"".join(chunks)))
        try:
            return await replay.form(max_files=MAX_FILES, max_fields=32)
        except StarletteHTTPException as exc:
            raise HTTPError(400, f"malformed multipart body: {exc.detail}") from None
        except Exception as exc:  # noqa: BLE001 - python-multipart raises various parse errors
            raise HTTPError(400, f"malformed multipart body: {type(exc).__name__}") from None

    async def _decode_files(self, form) -> list:
        """Decode every `file` field to an RGB array (415/413/400 per file, named)."""
        from raytimm.data.images import decode_image
        files = form.getlist("file")
        if not files:
            raise HTTPError(422, "missing 'file' field (multipart/form-data, one or more image files)")
        uploads = []
        for i, f in enumerate(files):
            if not isinstance(f, UploadFile):
                raise HTTPError(422, f"'file' field #{i + 1} is not a file upload")
            name = (f.filename or f"file #{i + 1}")[:120]
            data = await f.read()
            if not data:
                raise HTTPError(400, f"{name}: empty file")
            uploads.append((name, data))
        # Pillow releases the GIL while decoding: several files decode in parallel threads.
        decoded = await asyncio.gather(
            *(asyncio.to_thread(decode_image, data, max_pixels=self._max_pixels, name=name) for name, data in uploads),
            return_exceptions=True)
        for result in decoded:  # the first bad file in request order decides the answer (415/413 by type)
            if isinstance(result, BaseException):
                raise result
        return list(decoded)

    async def _run(self, images: list, top_k: int, model_id: Optional[str] = None) -> dict:
        handle = self._model.options(multiplexed_model_id=model_id) if model_id else self._model
        out = await handle.predict.remote(images, top_k)
        if "error" in out:
            raise HTTPError(out["error"]["status"], out["error"]["detail"])
        results = out["results"]
        return results[0] if len(results) == 1 else {"results": results}

    async def _resolve_request_checkpoint(self, path: str, model_name: Optional[str],
                                          num_classes: Optional[int]) -> str:
        """403 for disallowed paths (before any access), 404 for missing ones; the multiplexed model id."""
        from raytimm import checkpoint as ckpt
        uri = check_checkpoint_path(path, self._allow)
        resolved = await asyncio.to_thread(ckpt.resolve_checkpoint, uri)  # 404/422/502 via error_status
        check_resolved_path(resolved.uri, self._allow)
        if resolved.kind == "legacy_pt":
            if not model_name or not num_classes:
                raise HTTPError(422, f"legacy checkpoint {resolved.uri} needs the model_name and num_classes fields")
            return _model_id("legacy_pt", resolved.uri, model_name, num_classes)
        return _model_id("folder", resolved.uri)

    # -- routes

    @app.get("/healthz")
    async def healthz(self):
        """200 only when a model is loaded."""
        try:
            ready = await asyncio.wait_for(self._model.ready.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - replica starting or gone: not healthy
            ready = False
        if not ready:
            return JSONResponse({"status": "loading", "detail": "no model loaded"}, status_code=503)
        return {"status": "ok"}

    @app.get("/model")
    async def model(self, request: Request):
        """Model metadata, metrics, checkpoint URI, class names and reload status."""
        self._check_auth(request)
        return await self._model.metadata.remote()

    @app.post("/predict")
    async def predict(self, request: Request):
        """multipart `file` (repeatable) and `top_k` -> one result, or {"results": [...]} for several files."""
        self._check_auth(request)
        form = await self._read_form(request)
        top_k = parse_top_k(form.get("top_k", request.query_params.get("top_k")))
        images = await self._decode_files(form)
        return await self._run(images, top_k)

    @app.post("/inference/quick")
    async def inference_quick(self, request: Request):
        """The platform's form: file, training_job_id, model_name, num_classes, checkpoint_path?, top_k."""
        self._check_auth(request)
        form = await self._read_form(request)
        top_k = parse_top_k(form.get("top_k"))
        model_name = _text_field(form, "model_name")
        num_classes = _int_field(form, "num_classes")
        path = _text_field(form, "checkpoint_path")
        if path:
            model_id = await self._resolve_request_checkpoint(path, model_name, num_classes)
        else:
            if not model_name:
                raise HTTPError(422, "model_name is required when checkpoint_path is not given")
            _check_pretrained_name(model_name)
            model_id = _model_id("pretrained", model_name=model_name)
        images = await self._decode_files(form)
        return await self._run(images, top_k, model_id)


# ----------------------------------------------------------------------------- app builder

class ServeArgs(BaseModel):
    """Arguments of ``build_app`` (``serve run raytimm.serve:build_app checkpoint=URI key=value ...``)."""

    checkpoint: str = Field(description="checkpoint folder, run/tune folder, or legacy .pt (local, s3://, r2://)")
    model_name: Optional[str] = Field(None, description="timm model name (legacy .pt only)")
    num_classes: Optional[int] = Field(None, description="number of classes (legacy .pt only)")
    replicas: int = Field(_DEFAULTS.replicas, ge=1, description="model replicas (ignored with autoscaling)")
    max_batch_size: int = Field(_DEFAULTS.max_batch_size, ge=1)
    batch_wait_ms: float = Field(_DEFAULTS.batch_wait_ms, ge=0)
    max_upload_mb: float = Field(_DEFAULTS.max_upload_mb, gt=0)
    max_pixels: int = Field(_DEFAULTS.max_pixels, gt=0)
    allow: list = Field(default_factory=list, description="extra allowed checkpoint prefixes")
    allow_checkpoint_root: bool = Field(True, description="also allow the startup checkpoint's storage root")
    max_models: int = Field(_DEFAULTS.max_models, ge=1)
    num_cpus: float = Field(_DEFAULTS.num_cpus, ge=0, description="CPUs per model replica (= torch threads)")
    num_gpus: float = Field(_DEFAULTS.num_gpus, ge=0, description="GPUs per model replica; fractions share a GPU")
    ingress_num_cpus: float = Field(0.1, ge=0)
    ingress_replicas: int = Field(1, ge=1)
    weights_dir: Optional[str] = Field(None, description="pretrained weights folder (default $RAYTIMM_WEIGHTS_DIR)")
    autoscaling: Optional[dict] = Field(None, description="Serve autoscaling_config for the model deployment")

    @field_validator("allow", mode="before")
    @classmethod
    def _split_allow(cls, v):
        # `serve run ... allow=a,b` passes one string.
        if v is None:
            return []
        if isinstance(v, str):
            return [p for p in v.split(",") if p.strip()]
        return list(v)


def _code_version(*parts: Any) -> str:
    """A deployment version that stays the same across redeploys of the same code and init arguments.

    serve.run gives every deployment a random version, so each redeploy restarts replicas. With a
    stable version, a redeploy that changes only user_config (the checkpoint) calls reconfigure()
    on the running replicas instead: the in-place hot reload. (`serve deploy` computes its own.)
    """
    import hashlib

    import raytimm
    h = hashlib.sha256(raytimm.__version__.encode())
    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("serve.py", "predict.py", "checkpoint.py", "model.py"):
        try:
            with open(os.path.join(here, name), "rb") as f:
                h.update(f.read())
        except OSError:
            pass
    for part in parts:
        h.update(repr(part).encode())
    return h.hexdigest()[:16]


def _with_version(deployment, version: str):
    try:
        return deployment.options(version=version, _internal=True)
    except (TypeError, ValueError):  # Serve API moved: redeploys then restart replicas (still no failed requests)
        return deployment


def build_app(args: ServeArgs):
    """Typed Serve app builder: Ingress(FastAPI) bound to a ModelServer loaded from ``args.checkpoint``."""
    from raytimm import checkpoint as ckpt

    # Fail here, with the URI in the message, rather than in a replica's log.
    resolved = ckpt.resolve_checkpoint(args.checkpoint)
    allow = [normalize_prefix(p) for p in args.allow]
    if args.allow_checkpoint_root:
        allow.append(normalize_prefix(storage_root(resolved)))
    weights_dir = args.weights_dir or os.environ.get(WEIGHTS_DIR_ENV)
    env = _forwarded_env()
    if weights_dir:
        env[WEIGHTS_DIR_ENV] = weights_dir
    model_opts: dict = dict(
        ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus,
                           "runtime_env": {"env_vars": env}},
        user_config={"checkpoint": args.checkpoint, "model_name": args.model_name,
                     "num_classes": args.num_classes, "max_batch_size": args.max_batch_size,
                     "batch_wait_ms": args.batch_wait_ms, "max_pixels": args.max_pixels},
        max_ongoing_requests=max(32, 4 * args.max_batch_size),
    )
    if args.autoscaling:
        model_opts["autoscaling_config"] = args.autoscaling
    else:
        model_opts["num_replicas"] = args.replicas
    # Torch threads come from the CPUs Ray assigns each replica (also when serve.yaml overrides them).
    model_kwargs = dict(weights_dir=weights_dir, max_models=args.max_models)
    model = _with_version(ModelServer.options(**model_opts), _code_version("model", model_kwargs))
    model = model.bind(**model_kwargs)
    token = _read_token()
    # The token is folded into a hash so a changed token restarts the ingress; it is never stored in clear.
    ingress = _with_version(Ingress, _code_version("ingress", token.get()))
    ingress = ingress.options(
        num_replicas=args.ingress_replicas,
        ray_actor_options={"num_cpus": args.ingress_num_cpus, "runtime_env": {"env_vars": env}},
        user_config={"allow": allow, "max_upload_mb": args.max_upload_mb, "max_pixels": args.max_pixels},
        max_ongoing_requests=256,
    )
    return ingress.bind(model, token)


def deploy(args: ServeArgs, *, blocking: bool = False):
    """serve.run the app under the raytimm name at route '/' (re-running with a new checkpoint hot-reloads)."""
    return serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=blocking,
                     logging_config=_QUIET_LOGGING)


# ----------------------------------------------------------------------------- raytimm serve

def wait_healthy(url: str, timeout_s: float = 300.0) -> None:
    """Poll GET /healthz until 200; raise RaytimmError with the last answer after timeout_s."""
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/healthz", timeout=5) as r:
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except OSError as e:
            last = type(e).__name__
        time.sleep(0.5)
    raise RaytimmError(f"{url}/healthz did not become ready within {timeout_s:.0f}s (last: {last})")


def start_serve(host: str, port: int) -> bool:
    """ray.init (local, or the cluster at RAY_ADDRESS) and serve.start on host:port; True if we started Ray."""
    import ray

    from raytimm.logs import quiet_third_party
    quiet_third_party()
    started = False
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address="auto", logging_level=logging.WARNING, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
            started = True
    serve.start(http_options={"host": host, "port": int(port)}, logging_config=_QUIET_LOGGING)
    return started


def run_server(checkpoint: str, host: str = _DEFAULTS.host, port: int = _DEFAULTS.port,
               replicas: int = _DEFAULTS.replicas, max_batch_size: int = _DEFAULTS.max_batch_size,
               batch_wait_ms: float = _DEFAULTS.batch_wait_ms, allow: Optional[list] = None,
               max_upload_mb: float = _DEFAULTS.max_upload_mb, max_pixels: int = _DEFAULTS.max_pixels,
               max_models: int = _DEFAULTS.max_models, num_cpus: float = _DEFAULTS.num_cpus,
               num_gpus: float = _DEFAULTS.num_gpus, model_name: Optional[str] = None,
               num_classes: Optional[int] = None, weights_dir: Optional[str] = None,
               block: bool = True, ready_timeout_s: float = 600.0) -> str:
    """`raytimm serve`: start Serve, deploy, print the URL when /healthz is ready, block until Ctrl-C.

    SIGHUP re-resolves the checkpoint (e.g. a run folder's new `best`) and hot-reloads it.
    Returns the URL (when block=False the app keeps running; call shutdown_server()).
    """
    args = ServeArgs(checkpoint=checkpoint, model_name=model_name, num_classes=num_classes, replicas=replicas,
                     max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms, max_upload_mb=max_upload_mb,
                     max_pixels=max_pixels, allow=list(allow or []), max_models=max_models, num_cpus=num_cpus,
                     num_gpus=num_gpus, weights_dir=weights_dir)
    from raytimm import checkpoint as ckpt
    ckpt.resolve_checkpoint(checkpoint)  # before starting Ray: a typo fails in a second, not a minute
    started = start_serve(host, port)
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown_host}:{port}"
    try:
        deploy(args)
        wait_healthy(url, timeout_s=ready_timeout_s)
        print(f"raytimm serving {checkpoint} at {url}  (POST /predict, POST /inference/quick, GET /model)",
              flush=True)
        if not block:
            return url
        _block_until_interrupt(args)
    except BaseException:
        shutdown_server(stop_ray=started)
        raise
    shutdown_server(stop_ray=started)
    return url


def _block_until_interrupt(args: ServeArgs) -> None:
    """Sleep until Ctrl-C/SIGTERM; SIGHUP redeploys (hot reload of the checkpoint's current best)."""
    stop = threading.Event()
    reload_requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda *_: reload_requested.set())
    try:
        while not stop.is_set():
            time.sleep(0.5)
            if reload_requested.is_set():
                reload_requested.clear()
                args = _with_resolved(args)
                print(f"reloading {args.checkpoint}", flush=True)
                deploy(args)
    except KeyboardInterrupt:
        pass
    print("shutting down", flush=True)


def _with_resolved(args: ServeArgs) -> ServeArgs:
    """Pin the concrete checkpoint so a changed `best` pointer yields a new user_config (hot reload)."""
    from raytimm import checkpoint as ckpt
    return args.model_copy(update={"checkpoint": ckpt.resolve_checkpoint(args.checkpoint).uri})


def shutdown_server(stop_ray: bool = True) -> None:
    """serve.shutdown(), and ray.shutdown() when this process started Ray."""
    import ray
    try:
        serve.shutdown()
    except Exception as exc:  # noqa: BLE001 - shutting down anyway
        log.warning("serve.shutdown failed: %s", exc)
    if stop_ray and ray.is_initialized():
        ray.shutdown()

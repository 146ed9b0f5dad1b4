"""The HTTP ingress: FastAPI routes, auth, body limits, multipart parsing, image decoding,
allowed-prefix checks, and error mapping to 4xx JSON ``{"detail": ...}``; forwards arrays to ModelServer.

``@serve.ingress`` snapshots this module's globals when the class is decorated, so every helper the
routes use is imported above the class.
"""
import asyncio
import hmac
import logging
import os
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import SecretStr
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from raytimm.envvars import API_TOKEN_ENV
from raytimm.errors import RaytimmError
from raytimm.serve.http import (MAX_FILES, HTTPError, check_pretrained_name, error_status, int_field, parse_top_k,
                                text_field)
from raytimm.serve import page, training
from raytimm.serve.metrics import RequestMetricsMiddleware
from raytimm.serve.model import multiplexed_id
from raytimm.serve.paths import check_checkpoint_path, check_resolved_path, normalize_prefix
from raytimm.serve.settings import DEFAULTS, QUIET_LOGGING

log = logging.getLogger("raytimm.serve")

app = FastAPI(title="raytimm", docs_url=None, redoc_url=None, openapi_url=None)
app.add_middleware(RequestMetricsMiddleware)  # every request's route, code and duration (serve/metrics.py)
app.include_router(page.router)  # GET /: the page (serve/web/)
app.include_router(training.router)  # /training/*: the training API (answers 404 unless turned on)


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


@serve.deployment(logging_config=QUIET_LOGGING)
@serve.ingress(app)
class Ingress:
    """HTTP front: auth, limits, decoding, allowed prefixes; forwards arrays to ModelServer."""

    def __init__(self, model: DeploymentHandle, token: Optional[SecretStr] = None, training_api: Optional[dict] = None):
        from raytimm.logs import worker_logging_setup
        worker_logging_setup()
        self._model = model
        # The replica's own environment is the fallback (e.g. the token is injected into the cluster's pods).
        token_value = token.get_secret_value() if isinstance(token, SecretStr) else None
        self._token = (token_value or os.environ.get(API_TOKEN_ENV) or "").encode() or None
        # training_api: TrainingService's arguments (app.py), None when the API is off.
        training.install(training.TrainingService(**training_api) if training_api else None, self._check_auth)
        page.install(auth_required=self._token is not None, training=training_api is not None)
        self._allow: list = []
        self._max_upload = int(DEFAULTS.max_upload_mb * 1024 * 1024)
        self._max_pixels = DEFAULTS.max_pixels

    def reconfigure(self, config: dict) -> None:
        """user_config: allow (prefixes), max_upload_mb, max_pixels."""
        config = dict(config or {})
        self._allow = [normalize_prefix(p) for p in config.get("allow") or []]
        self._max_upload = int(float(config.get("max_upload_mb", DEFAULTS.max_upload_mb)) * 1024 * 1024)
        self._max_pixels = int(config.get("max_pixels", DEFAULTS.max_pixels))

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
        try:
            out = await handle.predict.remote(images, top_k)
        except RayActorError as exc:
            # The replica died (or became unreachable) mid-call. A model call is idempotent: send the same
            # arrays once more; Serve's router has already taken that replica out of its choices.
            log.warning("model replica lost during a call (%s); retrying once on another", type(exc).__name__)
            try:
                out = await handle.predict.remote(images, top_k)
            except RayActorError:
                raise HTTPError(503, "no model replica could answer; try again shortly") from None
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
            return multiplexed_id("legacy_pt", resolved.uri, model_name, num_classes)
        return multiplexed_id("folder", resolved.uri)

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
        model_name = text_field(form, "model_name")
        num_classes = int_field(form, "num_classes")
        path = text_field(form, "checkpoint_path")
        if path:
            model_id = await self._resolve_request_checkpoint(path, model_name, num_classes)
        else:
            if not model_name:
                raise HTTPError(422, "model_name is required when checkpoint_path is not given")
            check_pretrained_name(model_name)
            model_id = multiplexed_id("pretrained", model_name=model_name)
        images = await self._decode_files(form)
        return await self._run(images, top_k, model_id)

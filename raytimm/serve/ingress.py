"""The HTTP ingress: FastAPI routes, auth, body limits, multipart parsing, image decoding,
allowed-prefix checks, and error mapping to 4xx JSON ``{"detail": ...}``; forwards arrays to ModelServer.

``@serve.ingress`` snapshots this module's globals when the class is decorated, so every helper the
routes use is imported above the class.
"""
import asyncio
import contextlib
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

import raytimm
from raytimm import storage
from raytimm.envvars import API_TOKEN_ENV
from raytimm.errors import RaytimmError
from raytimm.serve.http import (MAX_FILES, HTTPError, check_name_syntax, error_status, int_field, parse_threshold,
                                parse_top_k, text_field)
from raytimm.serve import page, training
from raytimm.serve.metrics import RequestMetricsMiddleware
from raytimm.serve.model import multiplexed_id
from raytimm.serve.openapi import (AUTH_ONLY, HEALTH_RESPONSES, MODEL_RESPONSES, PREDICT_FORM, PREDICT_RESPONSES,
                                   QUICK_FORM, QUICK_RESPONSES, with_security_scheme)
from raytimm.serve.paths import check_checkpoint_path, check_resolved_path, normalize_prefix
from raytimm.serve.settings import DEFAULTS, QUIET_LOGGING

log = logging.getLogger("raytimm.serve")

# The OpenAPI document is served by Ingress.openapi_json below, behind the same auth as the other routes.
app = FastAPI(title="raytimm", version=raytimm.__version__, docs_url=None, redoc_url=None, openapi_url=None)
app.add_middleware(RequestMetricsMiddleware)  # every request's route, code and duration (serve/metrics.py)
HEALTH_WAIT_S = 2.0  # /healthz answers 503 when no model replica answers within this (pending, starting)
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
    # Keep Starlette's headers: a 405 names the allowed methods in `Allow`.
    return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError):
    return JSONResponse({"detail": "invalid request"}, status_code=422)


@app.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception):
    # A bug, not the client's fault; never a stack trace on the wire.
    log.error("unexpected error: %s: %s", type(exc).__name__, exc)
    return JSONResponse({"detail": "internal error"}, status_code=500)


def _resolve_for_request(uri: str):
    """resolve_checkpoint with a request's short retry budget: a bucket outage answers 502 in seconds."""
    from raytimm import checkpoint as ckpt
    with storage.retry_budget(storage.REQUEST_MAX_ATTEMPTS):
        return ckpt.resolve_checkpoint(uri)


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
        self._training_api = training_api is not None
        training.install(training.TrainingService(**training_api) if training_api else None, self._check_auth)
        page.install(auth_required=self._token is not None, training=training_api is not None)
        self._allow: list = []
        self._max_upload = int(DEFAULTS.max_upload_mb * 1024 * 1024)
        self._max_pixels = DEFAULTS.max_pixels
        self._allow_models: list = []
        self._max_model_params = DEFAULTS.max_model_params
        self._inflight = 0  # HTTP requests inside a route (drain waits for them)
        self._draining = False

    def reconfigure(self, config: dict) -> None:
        """user_config: allow (prefixes), max_upload_mb, max_pixels, allow_models, max_model_params."""
        config = dict(config or {})
        self._allow = [normalize_prefix(p) for p in config.get("allow") or []]
        self._max_upload = int(float(config.get("max_upload_mb", DEFAULTS.max_upload_mb)) * 1024 * 1024)
        self._max_pixels = int(config.get("max_pixels", DEFAULTS.max_pixels))
        self._allow_models = list(config.get("allow_models") or [])
        self._max_model_params = int(config.get("max_model_params", DEFAULTS.max_model_params))

    async def drain(self, timeout_s: float) -> dict:
        """Refuse new requests (503) and wait up to timeout_s for those inside a route; called on shutdown."""
        self._draining = True
        deadline = asyncio.get_running_loop().time() + max(0.0, float(timeout_s))
        while self._inflight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        return {"replica": serve.get_replica_context().replica_id.unique_id, "inflight": self._inflight}

    # -- request plumbing

    @contextlib.contextmanager
    def _accepted(self, request: Request):
        """Auth, then count the request as in flight (503 once draining: a load balancer retries elsewhere)."""
        if self._draining:
            raise HTTPError(503, "server is shutting down")
        self._check_auth(request)
        self._inflight += 1
        try:
            yield
        finally:
            self._inflight -= 1

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

    async def _run(self, images: list, top_k: int, model_id: Optional[str] = None,
                   threshold: Optional[float] = None) -> dict:
        handle = self._model.options(multiplexed_model_id=model_id) if model_id else self._model
        out = await self._call_model(handle, "predict", images, top_k, threshold)
        results = out["results"]
        return results[0] if len(results) == 1 else {"results": results}

    async def _call_model(self, handle: DeploymentHandle, method: str, *args, **kwargs) -> dict:
        """A ModelServer call; its {"error": {status, detail}} answer raised as HTTPError."""
        try:
            out = await getattr(handle, method).remote(*args, **kwargs)
        except RayActorError as exc:
            # The replica died (or became unreachable) mid-call. A model call is idempotent: send the same
            # arrays once more; Serve's router has already taken that replica out of its choices.
            log.warning("model replica lost during a call (%s); retrying once on another", type(exc).__name__)
            try:
                out = await getattr(handle, method).remote(*args, **kwargs)
            except RayActorError:
                raise HTTPError(503, "no model replica could answer; try again shortly") from None
        if "error" in out:
            raise HTTPError(out["error"]["status"], out["error"]["detail"])
        return out

    async def _resolve_request_checkpoint(self, path: str, model_name: Optional[str],
                                          num_classes: Optional[int]) -> str:
        """403 for disallowed paths (before any access), 404 for missing ones; the multiplexed model id."""
        uri = check_checkpoint_path(path, self._allow)
        resolved = await asyncio.to_thread(_resolve_for_request, uri)  # 404/422/502 via error_status
        check_resolved_path(resolved.uri, self._allow)
        if resolved.kind == "legacy_pt":
            if not model_name or not num_classes:
                raise HTTPError(422, f"legacy checkpoint {resolved.uri} needs the model_name and num_classes fields")
            # The architecture comes from the request: bounded like a pretrained one before it is built.
            await self._check_model(model_name, pretrained=False)
            return multiplexed_id("legacy_pt", resolved.uri, model_name, num_classes)
        return multiplexed_id("folder", resolved.uri)

    # -- routes

    @app.get("/healthz", responses=HEALTH_RESPONSES)
    async def healthz(self):
        """200 only when a model is loaded; 503 at once (bounded wait) while replicas start or wait for resources."""
        if self._draining:
            return JSONResponse({"status": "draining", "detail": "server is shutting down"}, status_code=503)
        try:
            ready = await asyncio.wait_for(self._model.ready.remote(), timeout=HEALTH_WAIT_S)
        except Exception:  # noqa: BLE001 - replica starting, pending or gone: not healthy
            return JSONResponse({"status": "loading", "detail": f"no model replica answered within "
                                                                f"{HEALTH_WAIT_S:g}s (starting, or waiting for "
                                                                f"resources)"}, status_code=503)
        if not ready:
            return JSONResponse({"status": "loading", "detail": "no model loaded"}, status_code=503)
        return {"status": "ok"}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_json(self, request: Request):
        """The OpenAPI document (multipart forms, answers, error bodies), behind the API token."""
        with self._accepted(request):
            doc = with_security_scheme(app.openapi())
            if not self._training_api:  # the /training routes answer 404 then: not part of this server's API
                doc = dict(doc, paths={p: v for p, v in doc["paths"].items() if not p.startswith("/training")})
            return doc

    @app.get("/model", responses=MODEL_RESPONSES, openapi_extra=AUTH_ONLY)
    async def model(self, request: Request):
        """Model metadata, metrics, checkpoint URI, class names and reload status."""
        with self._accepted(request):
            return await self._model.metadata.remote()

    @app.post("/predict", responses=PREDICT_RESPONSES, openapi_extra=PREDICT_FORM)
    async def predict(self, request: Request):
        """multipart `file` (repeatable), `top_k` and `threshold` (multi-label models) -> one result, or
        {"results": [...]} for several files."""
        with self._accepted(request):
            form = await self._read_form(request)
            query_k = parse_top_k(request.query_params.get("top_k"))  # checked even where the form's wins
            top_k = parse_top_k(form["top_k"]) if "top_k" in form else query_k
            threshold = parse_threshold(form)
            images = await self._decode_files(form)
            return await self._run(images, top_k, threshold=threshold)

    @app.post("/inference/quick", responses=QUICK_RESPONSES, openapi_extra=QUICK_FORM)
    async def inference_quick(self, request: Request):
        """The platform's form: file, training_job_id, model_name, num_classes, checkpoint_path?, top_k, threshold?."""
        with self._accepted(request):
            form = await self._read_form(request)
            top_k = parse_top_k(form.get("top_k"))
            threshold = parse_threshold(form)
            model_name = text_field(form, "model_name")
            num_classes = int_field(form, "num_classes")
            path = text_field(form, "checkpoint_path")
            if path:
                model_id = await self._resolve_request_checkpoint(path, model_name, num_classes)
            else:
                model_id = await self._check_pretrained(model_name)
            images = await self._decode_files(form)
            return await self._run(images, top_k, model_id, threshold)

    async def _check_pretrained(self, model_name: Optional[str]) -> str:
        """404/422 before anything is built (see serve/pretrained.py); the multiplexed model id."""
        if not model_name:
            raise HTTPError(422, "model_name is required when checkpoint_path is not given")
        await self._check_model(model_name, pretrained=True)
        return multiplexed_id("pretrained", model_name=model_name)

    async def _check_model(self, model_name: str, *, pretrained: bool) -> None:
        """Garbage names here (no timm in the ingress); the rest by a model replica, which has timm loaded
        and the weights folder the model would load from; nothing is built either way."""
        check_name_syntax(model_name)
        await self._call_model(self._model, "check_model", model_name, pretrained=pretrained,
                               allow_models=self._allow_models, max_params=self._max_model_params)

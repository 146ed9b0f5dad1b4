"""The model deployment: the served Predictor (hot-swapped through ``user_config``), an LRU of
request-selected models (``@serve.multiplexed``) and ``@serve.batch``-ed forward passes."""
import asyncio
import json
import logging
import os
import time
from typing import Optional

from ray import serve

from raytimm import storage
from raytimm.envvars import WEIGHTS_DIR_ENV
from raytimm.serve.http import HTTPError, check_pretrained_name, error_payload, error_status
from raytimm.serve.metrics import ModelMetrics
from raytimm.serve.pretrained import available_weights, check_model_size, check_pretrained_request
from raytimm.serve.settings import DEFAULTS, QUIET_LOGGING

log = logging.getLogger("raytimm.serve")


def multiplexed_id(kind: str, uri: Optional[str] = None, model_name: Optional[str] = None,
             num_classes: Optional[int] = None) -> str:
    """Multiplexed model id: the checkpoint URI (plus name/classes for a legacy .pt) or pretrained:<name>."""
    if kind == "pretrained":
        return f"pretrained:{model_name}"
    if kind == "legacy_pt":
        return json.dumps({"uri": uri, "model_name": model_name, "num_classes": num_classes}, sort_keys=True)
    return str(uri)


def load_from_model_id(model_id: str, *, weights_dir: Optional[str], max_pixels: int, device: Optional[str],
                       allow_hub: bool = False, backend: str = "torch", num_threads: Optional[int] = None):
    """Build a Predictor for a multiplexed model id (runs in a worker thread, for a request: a bucket
    checkpoint is read with the request's short retry budget, so an outage answers 502 in seconds).

    Checkpoints run on ``backend``; pretrained models always run on torch (there is no checkpoint to export).
    """
    with storage.retry_budget(storage.REQUEST_MAX_ATTEMPTS):
        return _load(model_id, weights_dir=weights_dir, max_pixels=max_pixels, device=device, allow_hub=allow_hub,
                     backend=backend, num_threads=num_threads)


def _load(model_id: str, *, weights_dir: Optional[str], max_pixels: int, device: Optional[str], allow_hub: bool,
          backend: str, num_threads: Optional[int]):
    from raytimm.predict import Predictor
    if model_id.startswith("pretrained:"):
        name = model_id[len("pretrained:"):]
        # Checked again on this node (the ingress checked its own): no weights here and no hub -> 404, unbuilt.
        weights = available_weights(name, weights_dir, allow_hub)
        return Predictor.pretrained(name, pretrained_file=weights, weights_dir=weights_dir, device=device,
                                    max_pixels=max_pixels)
    on = dict(device=device, max_pixels=max_pixels, backend=backend, num_threads=num_threads)
    if model_id.startswith("{"):
        spec = json.loads(model_id)
        return Predictor.from_checkpoint(spec["uri"], model_name=spec["model_name"],
                                         num_classes=spec["num_classes"], **on)
    return Predictor.from_checkpoint(model_id, **on)


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


@serve.deployment(logging_config=QUIET_LOGGING)
class ModelServer:
    """Holds the served Predictor (hot-swappable) and an LRU of request-selected models; batches forwards."""

    def __init__(self, *, weights_dir: Optional[str] = None, max_models: int = DEFAULTS.max_models,
                 num_threads: Optional[int] = None, device: Optional[str] = None,
                 allow_hub: bool = DEFAULTS.allow_hub, backend: str = DEFAULTS.backend):
        import torch

        from raytimm.logs import worker_logging_setup
        from raytimm.predict import check_backend
        worker_logging_setup()
        # torch's and ONNX Runtime's intra-op threads: the replica's CPUs (ORT would take every core otherwise).
        self._threads = max(1, int(num_threads or _assigned_cpus()))
        torch.set_num_threads(self._threads)
        self._backend = check_backend(backend)
        self._weights_dir = weights_dir or os.environ.get(WEIGHTS_DIR_ENV)
        self._device = device
        self._allow_hub = bool(allow_hub)
        self._max_pixels = DEFAULTS.max_pixels
        self._predictor = None
        self._spec: Optional[dict] = None
        self._reload_error: Optional[dict] = None
        self._loaded_at: Optional[float] = None
        # Built per instance so the LRU size is a runtime setting (Serve detects it on the instance).
        async def load_model(model_id: str):
            # A plain function, not a bound method: Serve caches its LRU on the function object.
            return await self._load_model(model_id)
        self._load_fn = load_model
        self._get_model = serve.multiplexed(max_num_models_per_replica=int(max_models))(load_model)
        self._metrics = ModelMetrics(models_held=self._models_held)

    def _models_held(self) -> int:
        """The served model plus the multiplexed LRU's size (read by the metrics thread)."""
        # Serve keeps the LRU on the decorated function (ray/serve/api.py, `__serve_multiplex_wrapper`);
        # there is no public accessor. tests/test_serve_metrics.py checks the count after a multiplexed load.
        lru = getattr(getattr(self._load_fn, "__serve_multiplex_wrapper", None), "models", None)
        return int(self._predictor is not None) + (len(lru) if lru is not None else 0)

    async def _load_model(self, model_id: str):
        start = time.monotonic()
        predictor = await asyncio.to_thread(load_from_model_id, model_id, weights_dir=self._weights_dir,
                                            max_pixels=self._max_pixels, device=self._device,
                                            allow_hub=self._allow_hub, backend=self._backend,
                                            num_threads=self._threads)
        self._metrics.record_load("multiplexed", time.monotonic() - start)
        return predictor

    async def reconfigure(self, config: dict) -> None:
        """Apply user_config: batch settings, and swap in a new checkpoint (old model keeps serving until then)."""
        config = dict(config or {})
        self._infer.set_max_batch_size(int(config.get("max_batch_size", DEFAULTS.max_batch_size)))
        self._infer.set_batch_wait_timeout_s(float(config.get("batch_wait_ms", DEFAULTS.batch_wait_ms)) / 1000.0)
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
                                          device=self._device, max_pixels=self._max_pixels,
                                          backend=self._backend, num_threads=self._threads)
        except Exception as exc:  # noqa: BLE001 - any load failure must leave the old model serving
            if self._predictor is None:
                raise  # nothing to fall back to: the replica fails to start, with this error
            self._reload_error = {"checkpoint": spec["checkpoint"], "error": f"{type(exc).__name__}: {exc}",
                                  "time": time.time()}
            log.error("reload of %s failed; still serving %s: %s", spec["checkpoint"], self._predictor.source, exc)
            return
        source = "startup" if self._predictor is None else "reload"
        self._predictor, self._spec = new, spec  # the swap: one reference assignment
        self._reload_error, self._loaded_at = None, time.time()
        seconds = time.monotonic() - start
        self._metrics.record_load(source, seconds)
        log.warning("serving %s (%s, %d classes), loaded in %.1fs", new.source, new.model_name, new.num_classes,
                    seconds)

    async def check_model(self, name: str, *, pretrained: bool, allow_models: list, max_params: int) -> dict:
        """What a request may build, decided here (timm is loaded; the weights folder is this node's) without
        building anything: {} when it may, else {"error": {status, detail}} (serve/pretrained.py)."""
        try:
            if pretrained:
                await asyncio.to_thread(check_pretrained_request, name, allow_models=allow_models,
                                        max_params=max_params, weights_dir=self._weights_dir,
                                        allow_hub=self._allow_hub)
            else:  # a legacy .pt's architecture, named by the request
                check_pretrained_name(name)
                await asyncio.to_thread(check_model_size, name, max_params)
            return {}
        except Exception as exc:  # noqa: BLE001 - answered as a status, like predict()
            return error_payload(exc)

    def ready(self) -> bool:
        """True once a model is loaded."""
        return self._predictor is not None

    def metadata(self) -> dict:
        """Metadata of the served model plus reload status."""
        if self._predictor is None:
            return {"loaded": False, "backend": self._backend, "reload_error": self._reload_error}
        meta = self._predictor.metadata()
        meta.update(loaded=True, requested_checkpoint=(self._spec or {}).get("checkpoint"),
                    loaded_at=self._loaded_at, reload_error=self._reload_error, replica=_replica_id(),
                    pid=os.getpid())  # the replica's process, for resident-memory checks
        return meta

    async def predict(self, images: list, top_k: int, threshold: Optional[float] = None) -> dict:
        """Top-k (and, multi-label, the labels reaching their threshold) for decoded RGB arrays with the served
        model, or the multiplexed one for this request; ``threshold`` overrides a multi-label model's."""
        try:
            model_id = serve.get_multiplexed_model_id()
            predictor = await self._get_model(model_id) if model_id else self._predictor
            if predictor is None:
                raise HTTPError(503, "no model loaded yet")
            if threshold is not None:
                predictor.label_thresholds(threshold)  # 422 for a single-label model, before any work
            tensors = await asyncio.to_thread(lambda: [predictor.preprocess(a) for a in images])
            k = predictor.clamp_top_k(top_k)
            results = await asyncio.gather(*(self._infer((predictor, t, k, threshold)) for t in tensors))
            return {"results": list(results)}
        except Exception as exc:  # noqa: BLE001 - answer with a status, never let Serve turn it into a 500 page
            if error_status(exc) >= 500 and not isinstance(exc, HTTPError):
                log.exception("model call failed")
            return error_payload(exc)

    @serve.batch(max_batch_size=DEFAULTS.max_batch_size, batch_wait_timeout_s=DEFAULTS.batch_wait_ms / 1000.0)
    async def _infer(self, items: list) -> list:
        """One forward per predictor over all queued images (several requests share a batch)."""
        import torch
        out: list = [None] * len(items)
        groups: dict = {}
        for i, (predictor, _, _, _) in enumerate(items):
            groups.setdefault(id(predictor), []).append(i)
        for idx in groups.values():
            predictor = items[idx[0]][0]
            batch = torch.stack([items[i][1] for i in idx])
            ks = [items[i][2] for i in idx]
            thresholds = [items[i][3] for i in idx]  # per request: batched requests may differ
            # Off the event loop, so the next batch can queue while this one runs.
            results = await asyncio.to_thread(predictor.predict_tensor_batch, batch, ks, thresholds)
            self._metrics.record_batch(len(idx))
            self._metrics.record_predictions(predictor.model_name, predictor.num_classes, results)
            for i, r in zip(idx, results):
                out[i] = r
        return out

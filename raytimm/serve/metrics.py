"""The Serve app's Prometheus metrics (``ray.serve.metrics``): the only place metric objects are made.

They reach Prometheus through Ray's metrics export port, beside Serve's built-in ones, with Ray's
prefix and suffixes: ``raytimm_requests`` is scraped as ``ray_raytimm_requests_total``, a histogram
``raytimm_request_seconds`` as ``ray_raytimm_request_seconds_{bucket,sum,count}``
(deploy/grafana/metric_names.txt lists every name deploy/grafana/raytimm-serve.json reads).

- ``RequestMetricsMiddleware``: ASGI middleware of the ingress app; every request's route template
  and status code (4xx from auth, limits and validation, 5xx included) and duration, in one place.
- ``ModelMetrics``: one per model replica; batch sizes, model load seconds by source, models held
  (refreshed every second: Ray drops a gauge not set again within two report intervals), top-1
  confidence and top-1 class per prediction.

Cheap on the request path: metric objects are made once per process, and every label has a bounded
set of values (route templates, status codes, load sources, timm model names, at most 1,000 class
names per model); nothing a client types becomes a label.
"""
import asyncio
import collections
import logging
import threading
import time
from typing import Callable, Iterable, Optional

from ray.serve import metrics

log = logging.getLogger("raytimm.serve")

# Label values
LOAD_SOURCES = ("startup", "reload", "multiplexed")
UNMATCHED_ROUTE = "unmatched"  # a path no route matches: one value, never the path itself
MAX_CLASS_LABELS = 1000  # models with more classes report every prediction as OTHER_CLASS
OTHER_CLASS = "_other"
MAX_LABEL_CHARS = 100

# Histogram boundaries (upper bounds; Prometheus adds +Inf). Ray exports a histogram's `_sum` as the sum
# of its buckets' midpoints, not of the values (ray/_private/telemetry/open_telemetry_metric_recorder.py),
# and the +Inf bucket's "midpoint" is twice the last boundary: the boundaries are chosen for that.
REQUEST_SECONDS_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
# Half-integers: a bucket (n - 0.5, n + 0.5] has midpoint n, so `_sum` is the exact number of images for
# batches of up to 32 (and `_sum / _count` the exact mean batch size); coarser above.
BATCH_SIZE_BUCKETS = [n + 0.5 for n in range(33)] + [48.5, 64.5, 128.5, 256.5, 512.5, 1024.5]
LOAD_SECONDS_BUCKETS = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]
# Ends at 1.0 so no probability lands in +Inf (whose midpoint would count it as 2.0).
CONFIDENCE_BUCKETS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0]

GAUGE_REFRESH_S = 1.0  # below the shortest export interval Ray allows (1 s), so the gauge never lapses


class IngressMetrics:
    """Request count by route and code, and request duration by route (one per ingress process)."""

    def __init__(self):
        self.requests = metrics.Counter(
            "raytimm_requests", description="HTTP requests answered by the raytimm ingress, by route and status code.",
            tag_keys=("route", "code"))
        self.request_seconds = metrics.Histogram(
            "raytimm_request_seconds", description="Time from request arrival to the end of the response, by route.",
            boundaries=REQUEST_SECONDS_BUCKETS, tag_keys=("route",))

    def record(self, route: str, code: int, seconds: float) -> None:
        """One answered request."""
        # Always a fresh dict: Serve fills an unset `route` into the dict it is given (and tags=None raises).
        self.requests.inc(1, tags={"route": route, "code": str(code)})
        self.request_seconds.observe(seconds, tags={"route": route})


_ingress_metrics: Optional[IngressMetrics] = None


def ingress_metrics() -> IngressMetrics:
    """This process's IngressMetrics, made on first use (inside the replica, so Serve adds its labels)."""
    global _ingress_metrics
    if _ingress_metrics is None:
        _ingress_metrics = IngressMetrics()
    return _ingress_metrics


def route_template(scope: dict) -> str:
    """The matched route's template (``/training/{job_id}``), or UNMATCHED_ROUTE; never the raw path."""
    return getattr(scope.get("route"), "path", None) or UNMATCHED_ROUTE


class RequestMetricsMiddleware:
    """ASGI middleware: records route, status code and duration of every HTTP request.

    Installed between Starlette's outer error middleware and the exception handlers, so it sees the
    4xx that the handlers make of raytimm errors, and an unhandled exception (answered 500 outside it)
    is recorded as 500 before it propagates.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: Optional[int] = None  # set when the response starts
        unanswered = 500  # what an exception before the response start becomes

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except asyncio.CancelledError:
            unanswered = 499  # the client went away first (nginx's code for it), not a server error
            raise
        finally:
            code = status if status is not None else unanswered
            try:
                ingress_metrics().record(route_template(scope), code, time.perf_counter() - start)
            except Exception as exc:  # noqa: BLE001 - a metric must never fail a request
                log.warning("request metrics not recorded: %s: %s", type(exc).__name__, exc)


def class_label(class_name: str, num_classes: int) -> str:
    """The `class` label of a prediction: the class name for models with at most 1,000 classes."""
    if num_classes > MAX_CLASS_LABELS:
        return OTHER_CLASS
    return str(class_name)[:MAX_LABEL_CHARS]


class ModelMetrics:
    """A model replica's metrics; ``models_held()`` is read every GAUGE_REFRESH_S by a daemon thread."""

    def __init__(self, models_held: Callable[[], int], refresh_s: float = GAUGE_REFRESH_S):
        self.batch_size = metrics.Histogram(
            "raytimm_batch_size", description="Images in each model forward pass (under-filled batches show here).",
            boundaries=BATCH_SIZE_BUCKETS)
        self.load_seconds = metrics.Histogram(
            "raytimm_model_load_seconds", description="Seconds to load a model, by source "
                                                      "(startup, reload via user_config, multiplexed).",
            boundaries=LOAD_SECONDS_BUCKETS, tag_keys=("source",))
        self.models_held = metrics.Gauge(
            "raytimm_models_held", description="Models held by this replica: the served one plus the "
                                               "multiplexed LRU.")
        self.top1_confidence = metrics.Histogram(
            "raytimm_top1_confidence", description="Top-1 probability of each prediction, by model.",
            boundaries=CONFIDENCE_BUCKETS, tag_keys=("model",))
        self.predictions = metrics.Counter(
            "raytimm_predictions", description="Predictions by model and top-1 class "
                                               f"({OTHER_CLASS!r} for models with over {MAX_CLASS_LABELS} classes).",
            tag_keys=("model", "class"))
        self._held = models_held
        self._refresh_s = refresh_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh_loop, name="raytimm-models-held", daemon=True)
        self._thread.start()

    def _refresh_loop(self) -> None:
        while True:
            self.refresh_models_held()
            if self._stop.wait(self._refresh_s):
                return

    def refresh_models_held(self) -> None:
        """Set the models-held gauge now (also called right after a load)."""
        try:
            self.models_held.set(int(self._held()), tags={})
        except Exception:  # noqa: BLE001 - a metric must never take the replica down
            pass

    def close(self) -> None:
        """Stop the refresh thread."""
        self._stop.set()

    def record_batch(self, size: int) -> None:
        """One model forward pass over ``size`` images."""
        self.batch_size.observe(size, tags={})

    def record_load(self, source: str, seconds: float) -> None:
        """A model loaded in ``seconds``; ``source`` is one of LOAD_SOURCES."""
        if source not in LOAD_SOURCES:
            raise ValueError(f"model load source {source!r} is not one of {LOAD_SOURCES}")
        self.load_seconds.observe(seconds, tags={"source": source})
        self.refresh_models_held()

    def record_predictions(self, model_name: str, num_classes: int, results: Iterable[dict]) -> None:
        """Top-1 confidence and class of each result dict (``predicted_class``, ``confidence``)."""
        model = str(model_name)[:MAX_LABEL_CHARS]
        per_class: collections.Counter = collections.Counter()
        for result in results:
            self.top1_confidence.observe(float(result["confidence"]), tags={"model": model})
            per_class[class_label(result["predicted_class"], num_classes)] += 1
        for name, count in per_class.items():
            self.predictions.inc(count, tags={"model": model, "class": name})

"""raytimm.serve.metrics without a Serve app: the request middleware's route/code/duration, label
bounds, bucket choices, the models-held refresh, and the --metrics-export-port pass-through.

tests/test_serve_metrics.py checks the same against a real app and a real Prometheus scrape.
"""
from __future__ import annotations

import asyncio
import logging
import time

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from raytimm.serve import metrics as m
from raytimm.serve.http import HTTPError


class Recorder:
    def __init__(self):
        self.calls: list = []

    def record(self, route, code, seconds):
        self.calls.append((route, code, seconds))


def _app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(m.RequestMetricsMiddleware)

    @app.exception_handler(HTTPError)
    async def client_error(_: Request, exc: HTTPError):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception):
        return JSONResponse({"detail": "internal error"}, status_code=500)

    @app.get("/ok")
    async def ok():
        return {"ok": True}

    @app.get("/jobs/{job_id}")
    async def job(job_id: str):
        if job_id == "missing":
            raise HTTPError(404, "no such job")
        return {"id": job_id}

    @app.post("/limit")
    async def limit():
        raise HTTPError(413, "too large")

    @app.get("/bug")
    async def bug():
        raise RuntimeError("a bug")

    @app.get("/slow")
    async def slow():
        await asyncio.sleep(10)

    return app


async def _call(app, method: str, path: str, cancel_after: float | None = None) -> int | None:
    """Drive the ASGI app once; the response status (None when cancelled first)."""
    sent: list = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": [],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    task = asyncio.ensure_future(app(scope, receive, send))
    if cancel_after is not None:
        await asyncio.sleep(cancel_after)
        task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return None
    except RuntimeError:
        pass  # Starlette re-raises an unhandled exception after its 500 handler has answered
    return next(msg["status"] for msg in sent if msg["type"] == "http.response.start")


@pytest.fixture
def recorded(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(m, "_ingress_metrics", rec)
    return rec.calls


def test_every_request_is_recorded_with_route_template_and_status(recorded):
    app = _app()

    async def run():
        return [await _call(app, "GET", "/ok"), await _call(app, "GET", "/jobs/abc-123"),
                await _call(app, "GET", "/jobs/missing"), await _call(app, "POST", "/limit"),
                await _call(app, "GET", "/bug"), await _call(app, "GET", "/no/such/path;rm -rf"),
                await _call(app, "POST", "/ok")]

    statuses = asyncio.run(run())
    assert statuses == [200, 200, 404, 413, 500, 404, 405]
    assert [(route, code) for route, code, _ in recorded] == [
        ("/ok", 200), ("/jobs/{job_id}", 200), ("/jobs/{job_id}", 404), ("/limit", 413), ("/bug", 500),
        (m.UNMATCHED_ROUTE, 404), ("/ok", 405)]
    assert all(seconds >= 0 for _, _, seconds in recorded)


def test_a_client_that_goes_away_is_499_not_500(recorded):
    app = _app()
    assert asyncio.run(_call(app, "GET", "/slow", cancel_after=0.2)) is None
    [(route, code, seconds)] = recorded
    assert (route, code) == ("/slow", 499) and seconds >= 0.2


def test_a_failing_metric_never_fails_the_request(monkeypatch, caplog):
    class Broken:
        def record(self, *a):
            raise RuntimeError("exporter down")

    monkeypatch.setattr(m, "_ingress_metrics", Broken())
    with caplog.at_level(logging.WARNING, logger="raytimm.serve"):
        assert asyncio.run(_call(_app(), "GET", "/ok")) == 200
    assert "request metrics not recorded" in caplog.text


def test_class_label_is_bounded():
    assert m.class_label("tabby cat", 1000) == "tabby cat"
    assert m.class_label("tabby cat", 1001) == m.OTHER_CLASS
    assert m.class_label("x" * 500, 3) == "x" * m.MAX_LABEL_CHARS


def _ray_midpoints(buckets):
    # Ray's exporter turns each bucket count into observations at these values (open_telemetry_metric_recorder).
    return [buckets[0] / 2] + [(buckets[i] + buckets[i - 1]) / 2 for i in range(1, len(buckets))]


def test_batch_size_buckets_make_the_exported_sum_exact():
    mids = _ray_midpoints(m.BATCH_SIZE_BUCKETS)
    for size in range(1, 33):
        bucket = next(i for i, b in enumerate(m.BATCH_SIZE_BUCKETS) if size <= b)
        assert mids[bucket] == size
    assert m.BATCH_SIZE_BUCKETS == sorted(m.BATCH_SIZE_BUCKETS)


def test_confidence_buckets_keep_every_probability_out_of_inf():
    assert m.CONFIDENCE_BUCKETS[-1] == 1.0 and m.CONFIDENCE_BUCKETS == sorted(m.CONFIDENCE_BUCKETS)


def test_models_held_gauge_is_refreshed_until_closed():
    calls = []

    def held():
        calls.append(time.monotonic())
        if len(calls) == 2:
            raise RuntimeError("read while the LRU changed")  # must not stop the refresh
        return 1

    metrics = m.ModelMetrics(models_held=held, refresh_s=0.02)
    deadline = time.monotonic() + 10
    while len(calls) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    metrics.close()
    metrics._thread.join(timeout=5)
    assert len(calls) >= 5 and not metrics._thread.is_alive()


def test_unknown_load_source_is_refused():
    metrics = m.ModelMetrics(models_held=lambda: 0, refresh_s=60)
    try:
        with pytest.raises(ValueError, match="startup"):
            metrics.record_load("warm", 1.0)
        metrics.record_load("multiplexed", 1.0)
    finally:
        metrics.close()


def test_metrics_export_port_goes_to_the_local_ray_only(monkeypatch, caplog):
    import ray

    from raytimm.serve import server

    inits = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: inits.append(kw))
    monkeypatch.setattr(server.serve, "start", lambda **kw: None)

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert server.start_serve("127.0.0.1", 8000, metrics_export_port=9100) is True
    assert inits[-1]["_metrics_export_port"] == 9100

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    with caplog.at_level(logging.WARNING, logger="raytimm.serve"):
        assert server.start_serve("127.0.0.1", 8000, metrics_export_port=9100) is False
    assert "_metrics_export_port" not in inits[-1] and inits[-1]["address"] == "auto"
    assert "--metrics-export-port 9100 ignored" in caplog.text

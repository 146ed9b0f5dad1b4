"""Prometheus metrics of the Serve app, and replica loss under load, against one real app for the module.

``raytimm serve``'s own start-up (``run_server``) starts a local Ray with ``metrics_export_port`` (the
``--metrics-export-port`` flag) and 2 model replicas; the tests talk HTTP to it and scrape
``http://127.0.0.1:PORT/metrics`` as Prometheus would. Counts are compared as differences between two
scrapes, so the tests do not depend on their order. Values reach the export port after Ray's report
interval (10 s, left at its default: Serve re-sets its own status gauges only every 10 s, and a gauge
lapses after two intervals), so a scrape is polled until the expected counts arrive, and checked again
an interval later.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import os
import signal
import threading
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from raytimm.envvars import API_TOKEN_ENV
from raytimm.serve.metrics import CONFIDENCE_BUCKETS, UNMATCHED_ROUTE
from raytimm.serve.server import run_server, shutdown_server
from raytimm.serve.settings import ServeSettings
from tests import helpers_images as hi
from tests import helpers_procs as procs
from tests.helpers_grafana import dashboard_metric_names, metric_names
from tests.helpers_net import free_port
from tests.test_predict import CLASSES, color_image, make_trained_checkpoint, png_bytes

TOKEN = "metrics-test-token-0123456789"
MAX_UPLOAD_MB = 1
REPORT_INTERVAL_S = 10.0  # Ray's default metrics_report_interval_ms
REPLICAS = 2

pytestmark = [pytest.mark.serve, pytest.mark.ray]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """`raytimm serve`'s start-up with a metrics export port and 2 model replicas (shut down at the end)."""
    root = tmp_path_factory.mktemp("serve_metrics")
    run1 = root / "runs" / "run1"
    # Two training steps: the answers need not be right here, only counted (and the same on every replica).
    ckpt1 = make_trained_checkpoint(run1, steps=2)
    saved = {k: os.environ.get(k) for k in (API_TOKEN_ENV, "RAY_ADDRESS")}
    os.environ.pop("RAY_ADDRESS", None)  # a local Ray of our own: run_server passes the export port to it
    os.environ[API_TOKEN_ENV] = TOKEN
    metrics_port = free_port()
    settings = ServeSettings(checkpoint=str(run1), port=free_port(), metrics_export_port=metrics_port,
                             replicas=REPLICAS, num_cpus=0.5, ingress_num_cpus=0.1, max_models=2,
                             max_upload_mb=MAX_UPLOAD_MB, max_batch_size=8, batch_wait_ms=5)
    try:
        url = run_server(settings, block=False, ready_timeout_s=300)
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {TOKEN}"
        # `kills` counts model replicas killed by earlier tests: each replacement loads its startup model.
        yield {"url": url, "s": session, "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
               "run1": str(run1), "ckpt1": ckpt1, "kills": 0}
    finally:
        shutdown_server(stop_ray=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------- scraping

def scrape(url: str) -> dict:
    """{(sample name, frozenset(labels)): value} of raytimm's own series and Serve's, summed over the
    labels Ray adds per process (WorkerId etc.), as a dashboard's `sum by` does."""
    text = requests.get(url, timeout=10).text
    out: dict = collections.defaultdict(float)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = {k: v for k, v in s.labels.items()
                      if k in ("route", "code", "le", "source", "model", "class", "replica", "application",
                               "deployment")}
            out[(s.name, frozenset(labels.items()))] += s.value
    return dict(out)


def names(samples: dict) -> set:
    """Every sample name in a scrape."""
    return {name for name, _ in samples}


def total(samples: dict, name: str, **labels) -> float:
    """Sum of the series called ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def series(samples: dict, name: str, key: str) -> dict:
    """{label value: summed value} of ``name`` grouped by one label."""
    out: dict = collections.defaultdict(float)
    for (n, ls), v in samples.items():
        if n == name:
            out[dict(ls).get(key)] += v
    return dict(out)


def poll(url: str, ready, timeout_s: float = 120.0, poke=None) -> dict:
    """Scrape until ``ready(samples)`` holds (calling ``poke()`` before each try), or until timeout_s;
    the caller's assertions then show what is missing."""
    deadline = time.monotonic() + timeout_s
    while True:
        if poke is not None:
            poke()
        samples = scrape(url)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(1.0)


def _file(name: str, data: bytes, ctype: str = "image/png"):
    return ("file", (name, data, ctype))


def _model_load_count(samples: dict, source: str) -> float:
    return total(samples, "ray_raytimm_model_load_seconds_count", source=source)


# ----------------------------------------------------------------------------- metrics

def test_request_counts_and_model_metrics_are_exact(app):
    url, s = app["url"], app["s"]
    before = poll(app["metrics"], lambda m: _model_load_count(m, "startup") >= REPLICAS + app["kills"])
    if app["kills"]:  # the load test ran first: let its last counts land, and the dead replica's gauge lapse
        time.sleep(2.5 * REPORT_INTERVAL_S)
        before = scrape(app["metrics"])
    expected_codes: collections.Counter = collections.Counter()
    predicted: collections.Counter = collections.Counter()  # class -> images, from the answers
    confidences: list = []

    def send(route: str, want: int, **kw) -> requests.Response:
        r = (kw.pop("client", s)).post(url + route, timeout=60, **kw)
        assert r.status_code == want, (route, r.status_code, r.text)
        expected_codes[(route, str(want))] += 1
        if want == 200:
            body = r.json()
            for result in body.get("results", [body]):
                predicted[result["predicted_class"]] += 1
                confidences.append(result["confidence"])
        return r

    colors = ["red", "green", "blue", "blue", "green", "red", "red"]
    send("/predict", 200, files=[_file("a.png", png_bytes(color_image("green", seed=1)))])
    send("/predict", 200, files=[_file(f"{i}.png", png_bytes(color_image(c, seed=i))) for i, c in enumerate(colors)],
         data={"top_k": "2"})
    send("/predict", 200, files=[_file("j.jpg", hi.rgb_jpeg(), "image/jpeg"), _file("p.png", hi.rgb_png())])
    send("/predict", 415, files=[_file("notes.txt", hi.text_bytes(), "text/plain")])
    send("/predict", 415, files=[_file("cut.jpg", hi.truncated_jpeg(), "image/jpeg")])
    send("/predict", 422, files=[_file("a.png", hi.rgb_png())], data={"top_k": "0"})
    send("/predict", 422, files=[_file("a.png", hi.rgb_png())], data={"top_k": "abc"})
    send("/predict", 413, files=[_file("big.png", os.urandom(MAX_UPLOAD_MB * 1024 * 1024 + 1000))])
    send("/predict", 401, files=[_file("a.png", hi.rgb_png())], client=requests.Session())
    send("/inference/quick", 200, files=[_file("b.png", png_bytes(color_image("blue", seed=5)))],
         data={"checkpoint_path": app["run1"], "training_job_id": "job-1"})
    send("/inference/quick", 422, files=[_file("b.png", hi.rgb_png())], data={"training_job_id": "job-1"})
    r = s.get(url + "/no/such/route", timeout=30)
    assert r.status_code == 404
    expected_codes[(UNMATCHED_ROUTE, "404")] += 1
    images = sum(predicted.values())
    assert images == 1 + len(colors) + 2 + 1

    def delta(now: dict, name: str, **labels) -> float:
        return total(now, name, **labels) - total(before, name, **labels)

    def counts_arrived(now: dict) -> bool:
        return (all(delta(now, "ray_raytimm_requests_total", route=r, code=c) >= n
                    for (r, c), n in expected_codes.items())
                and delta(now, "ray_raytimm_predictions_total") >= images
                and delta(now, "ray_raytimm_batch_size_sum") >= images
                and _model_load_count(now, "multiplexed") >= 1)

    arrived = poll(app["metrics"], counts_arrived)
    settled_at = time.monotonic() + 1.5 * REPORT_INTERVAL_S

    # Every series the dashboard reads exists (and the dashboard's list is the shipped one). The proxy's
    # in-flight gauge is set per request and lapses after two report intervals: traffic keeps it there.
    assert dashboard_metric_names() == metric_names()
    seen = poll(app["metrics"], lambda m: dashboard_metric_names() <= names(m),
                poke=lambda: requests.get(url + "/healthz", timeout=30))
    missing = dashboard_metric_names() - names(seen)
    assert not missing, f"the dashboard reads series this app does not export: {sorted(missing)}"

    # Then once more after a report interval: a count that would still grow past the expected one shows.
    time.sleep(max(0.0, settled_at - time.monotonic()))
    after = scrape(app["metrics"])
    assert counts_arrived(arrived), "counts did not arrive within the poll's timeout"

    # Exactly one count per request, under its route template and status code, and one duration each.
    for route in {r for r, _ in expected_codes}:
        got = {c: delta(after, "ray_raytimm_requests_total", route=route, code=c)
               for c in {dict(ls).get("code") for (n, ls) in after if n == "ray_raytimm_requests_total"}}
        want = {c: float(n) for (r, c), n in expected_codes.items() if r == route}
        assert {c: v for c, v in got.items() if v} == want, route
        assert delta(after, "ray_raytimm_request_seconds_count", route=route) == sum(want.values()), route
        assert delta(after, "ray_raytimm_request_seconds_bucket", route=route, le="+Inf") == sum(want.values())
    # Nothing a client sent became a label: only route templates (and the one unmatched value).
    routes = {dict(ls).get("route") for (n, ls) in after if n == "ray_raytimm_requests_total"}
    assert routes <= {"/predict", "/inference/quick", "/healthz", "/model", UNMATCHED_ROUTE}, routes

    # Every predicted image: one top-1 class (as the answers said) and one confidence.
    by_class = {k: v - series(before, "ray_raytimm_predictions_total", "class").get(k, 0.0)
                for k, v in series(after, "ray_raytimm_predictions_total", "class").items()}
    assert {k: v for k, v in by_class.items() if v} == {k: float(v) for k, v in predicted.items()}
    assert set(by_class) <= set(CLASSES)
    assert set(series(after, "ray_raytimm_predictions_total", "model")) == {"test_resnet"}
    assert delta(after, "ray_raytimm_top1_confidence_count") == images
    for bound in CONFIDENCE_BUCKETS:  # each confidence in its bucket (Ray's `_sum` is made of bucket midpoints)
        assert delta(after, "ray_raytimm_top1_confidence_bucket", le=str(float(bound))) == sum(
            c <= bound for c in confidences), bound

    # Batches: every image in exactly one forward pass; at most 8 (max_batch_size) per pass.
    assert delta(after, "ray_raytimm_batch_size_sum") == images
    batches = delta(after, "ray_raytimm_batch_size_count")
    assert 4 <= batches <= images  # 4 sequential model calls; the 7 images of one call may share a pass
    assert delta(after, "ray_raytimm_batch_size_bucket", le="8.5") == batches

    # Loads: one startup load per model replica ever started; the /inference/quick checkpoint once.
    assert _model_load_count(after, "startup") == REPLICAS + app["kills"]
    assert delta(after, "ray_raytimm_model_load_seconds_count", source="multiplexed") == 1
    assert _model_load_count(after, "reload") == 0

    # Models held per live replica: its startup model, plus the multiplexed one on the replica that loaded it.
    held = series(after, "ray_raytimm_models_held", "replica")
    assert sorted(held.values()) == [1.0, 2.0], held


# ----------------------------------------------------------------------------- replica loss under load

def _model_replica_pids() -> list:
    return procs.find(os.getpid(), procs.MODEL_REPLICA)


def _running_model_replicas() -> int:
    from ray import serve
    app_status = serve.status().applications["raytimm"]
    return app_status.deployments["ModelServer"].replica_states.get("RUNNING", 0)


def test_replica_loss_under_load_fails_no_request(app):
    url = app["url"]
    pids = _model_replica_pids()
    assert len(pids) == REPLICAS, [procs.cmdline(p) for p in pids]
    stop = threading.Event()
    lock = threading.Lock()
    answers: list = []  # (time answered, status)
    failures: list = []
    image = png_bytes(color_image("red", seed=11))
    two = [_file("r.png", image), _file("g.png", png_bytes(color_image("green", seed=12)))]
    reference = app["s"].post(url + "/predict", files=[_file("r.png", image)], timeout=60).json()["predicted_class"]

    def client(i: int):
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {TOKEN}"
        n = 0
        while not stop.is_set():
            files = two if n % 2 else [_file("r.png", image)]
            n += 1
            try:
                r = session.post(url + "/predict", files=files, timeout=120)
            except requests.RequestException as e:
                with lock:
                    failures.append(repr(e))
                continue
            with lock:
                answers.append((time.monotonic(), r.status_code))
                if r.status_code != 200:
                    failures.append((r.status_code, r.text[:300]))
                elif r.json().get("results", [r.json()])[0]["predicted_class"] != reference:
                    failures.append(("wrong answer", r.text[:300]))

    with cf.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client, i) for i in range(4)]
        try:
            deadline = time.monotonic() + 60
            while len(answers) < 20 and time.monotonic() < deadline:  # load is flowing to both replicas
                time.sleep(0.1)
            victim = pids[0]
            os.kill(victim, signal.SIGKILL)
            app["kills"] += 1
            killed_at = time.monotonic()
            time.sleep(8)  # load keeps running while Serve notices and replaces the replica
        finally:
            stop.set()
        for f in futures:
            f.result()
    assert failures == []
    assert not procs.alive(victim)
    after_kill = [t for t, _ in answers if t > killed_at]
    assert len(after_kill) >= 4, "no load ran after the kill"

    # Serve brings the deployment back to 2 running replicas (a new process) and /healthz to 200.
    deadline = time.monotonic() + 180
    while _running_model_replicas() < REPLICAS or len(_model_replica_pids()) < REPLICAS:
        assert time.monotonic() < deadline, f"model replicas running: {_running_model_replicas()}"
        time.sleep(1)
    assert victim not in _model_replica_pids()
    assert requests.get(url + "/healthz", timeout=30).status_code == 200

"""Serve with ``backend: onnx`` beside ``backend: torch``: one Ray + Serve for the module, two apps.

Both apps serve the same trained colour checkpoint (tests/test_predict.py), so every answer of the
ONNX Runtime app can be compared with the eager-PyTorch app's answer to the same request.
"""
import concurrent.futures as cf
import sys
import time

import pytest
import requests

from raytimm.envvars import CACHE_DIR_ENV
from raytimm.errors import ConfigError
from raytimm.serve.app import build_app, check_backend_installed
from raytimm.serve.server import wait_healthy
from raytimm.serve.settings import QUIET_LOGGING, ServeArgs, settings_from_cli
from tests.helpers_serve import local_serve
from tests.test_predict import CLASSES, color_image, make_trained_checkpoint, png_bytes, save_upper_case_copy

ROUTES = {"torch": "/torch", "onnx": "/onnx"}
IMAGES = [(name, seed) for name in CLASSES for seed in (7, 8)]  # a few noisy images of every class


def _deploy(*apps: tuple) -> None:
    """(ServeArgs, backend) pairs as the apps raytimm-<backend> at /<backend>, deployed side by side."""
    from ray import serve
    serve.run_many([serve.RunTarget(build_app(args), name=f"raytimm-{backend}", route_prefix=ROUTES[backend],
                                    logging_config=QUIET_LOGGING) for args, backend in apps])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A trained checkpoint, a copy under upper-case names (a reload shows), both apps; the export the onnx app made."""

    root = tmp_path_factory.mktemp("serve_onnx")
    runs = root / "runs"
    run1 = runs / "run1"
    ckpt1 = make_trained_checkpoint(run1)
    ckpt2 = save_upper_case_copy(ckpt1, str(runs / "run2" / "checkpoint_000002"))
    cache = root / "cache"
    # The replicas' node cache, inherited by Ray.
    with local_serve(env={CACHE_DIR_ENV: str(cache)}) as base:
        args = {b: ServeArgs(checkpoint=str(run1), backend=b, num_cpus=0.5, ingress_num_cpus=0.1, max_models=2,
                             max_batch_size=8, batch_wait_ms=5, allow=[str(cache)]) for b in ROUTES}
        _deploy(*((a, b) for b, a in args.items()))
        for route in ROUTES.values():
            wait_healthy(base + route, timeout_s=180)
        # The onnx app exported ckpt1 into the node cache at start: that folder is an export like
        # `raytimm export` writes (no second export here; each costs seconds on 2 cores).
        exports = sorted(p for p in (cache / "onnx").iterdir() if p.is_dir() and not p.name.startswith("."))
        assert len(exports) == 1, exports
        yield {"base": base, "args": args, "ckpt1": ckpt1, "ckpt2": ckpt2, "exported": str(exports[0]),
               "run1": str(run1)}


def _url(env, backend: str, path: str) -> str:
    return env["base"] + ROUTES[backend] + path


def _post(env, backend, path, images, data=None):
    files = [("file", (f"{n}{s}.png", png_bytes(color_image(n, seed=s)), "image/png")) for n, s in images]
    r = requests.post(_url(env, backend, path), files=files, data=data or {}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _shape(value):
    """The JSON's structure: keys and types, list lengths kept (what 'identical in shape' compares)."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return type(value).__name__


def _assert_same_answers(torch_answer: dict, onnx_answer: dict) -> None:
    """Same JSON shape, same top-k classes, confidences equal to fp32 rounding."""
    assert _shape(onnx_answer) == _shape(torch_answer)
    t_rows = torch_answer.get("results", [torch_answer])
    o_rows = onnx_answer.get("results", [onnx_answer])
    for t, o in zip(t_rows, o_rows):
        assert [p["class_id"] for p in o["top_k_predictions"]] == [p["class_id"] for p in t["top_k_predictions"]]
        assert o["predicted_class"] == t["predicted_class"]
        for po, pt in zip(o["top_k_predictions"], t["top_k_predictions"]):
            assert po["confidence"] == pytest.approx(pt["confidence"], abs=1e-4)


@pytest.mark.serve
@pytest.mark.ray
def test_model_names_the_backend(env):
    meta = {b: requests.get(_url(env, b, "/model"), timeout=30).json() for b in ROUTES}
    assert meta["torch"]["backend"] == "torch" and meta["onnx"]["backend"] == "onnx"
    onnx = meta["onnx"]
    assert onnx["checkpoint"] == env["ckpt1"] and onnx["class_names"] == CLASSES
    assert onnx["providers"] == ["CPUExecutionProvider"]  # no GPU given to the replica
    assert onnx["threads"] == 1  # the replica's 0.5 CPU, not every core of the node


@pytest.mark.serve
@pytest.mark.ray
def test_predict_same_answers_and_top1_as_torch(env):
    one = {b: _post(env, b, "/predict", IMAGES[:1], {"top_k": "3"}) for b in ROUTES}
    _assert_same_answers(one["torch"], one["onnx"])
    many = {b: _post(env, b, "/predict", IMAGES) for b in ROUTES}
    _assert_same_answers(many["torch"], many["onnx"])
    assert [r["predicted_class"] for r in many["onnx"]["results"]] == [n for n, _ in IMAGES]


@pytest.mark.serve
@pytest.mark.ray
@pytest.mark.parametrize("which", ["ckpt2", "exported"])
def test_quick_with_checkpoint_path_same_answers(env, which):
    """Multiplexed checkpoints: a regular one (exported at load on the onnx app) and an export folder."""
    form = {"checkpoint_path": env[which], "training_job_id": "t1"}
    onnx = _post(env, "onnx", "/inference/quick", IMAGES[:2], form)
    if which == "exported":  # the torch backend cannot run an export; its source checkpoint gives the reference
        form = {**form, "checkpoint_path": env["ckpt1"]}
    torch_answer = _post(env, "torch", "/inference/quick", IMAGES[:2], form)
    _assert_same_answers(torch_answer, onnx)
    want = [n.upper() if which == "ckpt2" else n for n, _ in IMAGES[:2]]
    assert [r["predicted_class"] for r in onnx["results"]] == want


@pytest.mark.serve
@pytest.mark.ray
def test_concurrent_requests_batch_on_onnx(env):
    """16 requests at once share forwards (serve.batch) and each gets the answer for its own image."""
    jobs = [(CLASSES[i % 3], 100 + i) for i in range(16)]
    with cf.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda job: _post(env, "onnx", "/predict", [job]), jobs))
    assert [a["predicted_class"] for a in answers] == [n for n, _ in jobs]


@pytest.mark.serve
@pytest.mark.ray
def test_hot_reload_with_onnx(env):
    """Redeploying a new checkpoint reconfigures the running onnx replica in place (what SIGHUP does)."""
    before = requests.get(_url(env, "onnx", "/model"), timeout=30).json()
    _deploy((env["args"]["onnx"].model_copy(update={"checkpoint": env["ckpt2"]}), "onnx"))
    deadline = time.monotonic() + 120
    while (meta := requests.get(_url(env, "onnx", "/model"), timeout=30).json())["checkpoint"] != env["ckpt2"]:
        assert time.monotonic() < deadline, f"reload did not happen: {meta}"
        time.sleep(0.3)
    assert meta["backend"] == "onnx" and meta["replica"] == before["replica"] and meta["reload_error"] is None
    answer = _post(env, "onnx", "/predict", [("green", 3)])
    assert answer["predicted_class"] == "GREEN"


def test_onnx_backend_without_onnxruntime_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    check_backend_installed(ServeArgs(checkpoint="x", backend="torch"))  # torch needs nothing more
    with pytest.raises(ConfigError) as err:
        check_backend_installed(ServeArgs(checkpoint="x", backend="onnx"))
    assert "raytimm[onnx]" in str(err.value) and "\n" not in str(err.value)


def test_backend_setting_is_checked():
    assert settings_from_cli(None, {"backend": "onnx"}).backend == "onnx"
    with pytest.raises(ConfigError, match="--backend"):
        settings_from_cli(None, {"backend": "tensorflow"})

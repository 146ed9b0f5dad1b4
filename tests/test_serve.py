"""Ray Serve app over real HTTP on 127.0.0.1: one Ray + Serve instance for the whole module.

The served model is trained in the test (tests/test_predict.py: solid colours), so every answer can
be checked against the image that was sent and against the Predictor run locally.
"""
import concurrent.futures as cf
import json
import os
import threading
import time

import pytest
import requests
import torch

from raytimm import checkpoint as ckpt
from raytimm.envvars import API_TOKEN_ENV
from raytimm.serve.app import deploy
from raytimm.serve.http import HTTPError, parse_top_k
from raytimm.serve.ingress import Ingress
from raytimm.serve.model import ModelServer
from raytimm.serve.paths import check_checkpoint_path, normalize_prefix, storage_root
from raytimm.serve.server import wait_healthy
from raytimm.serve.settings import ServeArgs
from raytimm.predict import Predictor
from tests import helpers_images as hi
from tests.test_predict import (CLASSES, MODEL, color_image, make_trained_checkpoint, png_bytes,
                                save_upper_case_copy)
from tests.helpers_serve import bearer_session, local_serve


TOKEN = "test-token-0123456789"
MAX_UPLOAD_MB = 2



@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Checkpoints, a legacy .pt, pretrained weights, and a running app (shut down at the end)."""
    import safetensors.torch
    import timm

    root = tmp_path_factory.mktemp("serve")
    runs = root / "runs"
    run1 = runs / "run1"
    ckpt1 = make_trained_checkpoint(run1)
    # The same weights under other class names: a hot reload is visible in every answer.
    ckpt2 = save_upper_case_copy(ckpt1, str(runs / "run2" / "checkpoint_000002"))
    legacy = runs / "legacy" / "best.pt"
    legacy.parent.mkdir(parents=True)
    torch.save({"model_state_dict": ckpt.load_model_state(ckpt1), "epoch": 3}, legacy)
    weights = root / "weights"
    weights.mkdir()
    torch.manual_seed(3)
    safetensors.torch.save_file(timm.create_model(MODEL, pretrained=False).state_dict(),
                                str(weights / f"{MODEL}.safetensors"))
    def copy_of_ckpt1(run_dir):
        path = str(run_dir / "checkpoint_000001")
        ckpt.save_checkpoint(path, model_state=ckpt.load_model_state(ckpt1), meta=ckpt.load_meta(ckpt1))
        ckpt.write_best_pointer(str(run_dir), path, {})
        return path

    extra = root / "extra"  # allowed through --allow
    extra_ckpt = copy_of_ckpt1(extra / "runA")
    outside = root / "outside"  # not allowed
    outside_ckpt = copy_of_ckpt1(outside / "runB")

    with local_serve(env={API_TOKEN_ENV: TOKEN}) as url:
        args = ServeArgs(checkpoint=str(run1), num_cpus=0.5, ingress_num_cpus=0.1, max_models=3,
                         max_upload_mb=MAX_UPLOAD_MB, allow=[str(extra)], weights_dir=str(weights),
                         max_batch_size=8, batch_wait_ms=5)
        deploy(args)
        wait_healthy(url, timeout_s=180)
        yield {"url": url, "s": bearer_session(TOKEN), "args": args, "run1": str(run1), "ckpt1": ckpt1,
               "ckpt2": ckpt2, "legacy": str(legacy), "weights": str(weights), "extra_ckpt": extra_ckpt,
               "outside": str(outside), "outside_ckpt": outside_ckpt, "runs": str(runs), "root": root}


def _file(name="x.png", data=None, ctype="image/png"):
    return ("file", (name, data if data is not None else png_bytes(color_image("red")), ctype))


def _post(env, path, files=None, data=None, **kw):
    return env["s"].post(env["url"] + path, files=files, data=data, timeout=60, **kw)


def _assert_error(r, status):
    assert r.status_code == status, r.text
    body = r.json()
    assert isinstance(body["detail"], str) and body["detail"]
    assert "Traceback" not in r.text
    return body["detail"]


# ----------------------------------------------------------------------------- basics and auth

@pytest.mark.serve
@pytest.mark.ray
def test_health_and_model_metadata(env):
    assert requests.get(env["url"] + "/healthz", timeout=10).status_code == 200  # no token needed
    meta = env["s"].get(env["url"] + "/model", timeout=10).json()
    assert meta["checkpoint"] == env["ckpt1"]  # the run folder resolved to its best checkpoint
    assert meta["class_names"] == CLASSES and meta["model_name"] == MODEL
    assert meta["metrics"] == {"val/top1": 100.0} and meta["reload_error"] is None


@pytest.mark.serve
@pytest.mark.ray
@pytest.mark.parametrize("header", [None, "Bearer wrong-token", f"Basic {TOKEN}", "Bearer"])
def test_auth_required_except_healthz(env, header):
    headers = {"Authorization": header} if header else {}
    for method, path, kw in (("get", "/model", {}), ("post", "/predict", {"files": [_file()]}),
                             ("post", "/inference/quick", {"files": [_file()], "data": {"model_name": MODEL}})):
        r = getattr(requests, method)(env["url"] + path, headers=headers, timeout=30, **kw)
        assert _assert_error(r, 401)
        assert r.headers.get("www-authenticate") == "Bearer"
        assert TOKEN not in r.text


@pytest.mark.serve
@pytest.mark.ray
def test_predict_one_and_many_files(env):
    r = _post(env, "/predict", files=[_file("g.png", png_bytes(color_image("green")))], data={"top_k": "2"})
    assert r.status_code == 200, r.text
    one = r.json()
    assert one["task_type"] == "image_classification" and one["predicted_class"] == "green"
    assert len(one["top_k_predictions"]) == 2 and one["confidence"] == one["top_k_predictions"][0]["confidence"]

    colors = ["red", "blue", "green", "green", "red", "blue", "blue"]
    files = [_file(f"{i}.png", png_bytes(color_image(c, seed=i))) for i, c in enumerate(colors)]
    r = _post(env, "/predict", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["predicted_class"] for x in results] == colors
    assert all(len(x["top_k_predictions"]) == 3 for x in results)  # default top_k=5 clamped to 3 classes


@pytest.mark.serve
@pytest.mark.ray
def test_32_concurrent_requests_each_get_their_own_answer(env):
    local = Predictor.from_checkpoint(env["ckpt1"])
    colors = [CLASSES[(i * 7) % 3] for i in range(32)]
    images = [color_image(c, seed=100 + i) for i, c in enumerate(colors)]
    expected = local.predict(images, top_k=3)

    def call(i):
        r = _post(env, "/predict", files=[_file(f"{i}.png", png_bytes(images[i]))], data={"top_k": "3"})
        assert r.status_code == 200, r.text
        return r.json()

    with cf.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(call, range(32)))
    for i, (got, want) in enumerate(zip(answers, expected)):
        assert got["predicted_class"] == colors[i] == want["predicted_class"]
        assert [p["class_id"] for p in got["top_k_predictions"]] == [p["class_id"] for p in want["top_k_predictions"]]
        assert got["confidence"] == pytest.approx(want["confidence"], abs=1e-5)


# ----------------------------------------------------------------------------- /inference/quick

@pytest.mark.serve
@pytest.mark.ray
def test_quick_with_checkpoint_folder_and_run_folder(env):
    for path in (env["ckpt1"], env["run1"], env["extra_ckpt"]):
        r = _post(env, "/inference/quick", files=[_file("b.png", png_bytes(color_image("blue")))],
                  data={"checkpoint_path": path, "training_job_id": "job-1", "model_name": MODEL, "top_k": "1"})
        assert r.status_code == 200, (path, r.text)
        body = r.json()
        assert len(body["top_k_predictions"]) == 1 and body["predicted_class"] == "blue"


@pytest.mark.serve
@pytest.mark.ray
def test_quick_with_legacy_pt(env):
    arr = color_image("red", seed=5)
    local = Predictor.from_checkpoint(env["legacy"], model_name=MODEL, num_classes=3)
    (want,) = local.predict([arr], top_k=3)
    r = _post(env, "/inference/quick", files=[_file("r.png", png_bytes(arr))],
              data={"checkpoint_path": env["legacy"], "model_name": MODEL, "num_classes": "3", "top_k": "3"})
    assert r.status_code == 200, r.text
    got = r.json()
    assert [p["class_id"] for p in got["top_k_predictions"]] == [p["class_id"] for p in want["top_k_predictions"]]
    assert got["confidence"] == pytest.approx(want["confidence"], abs=1e-5)
    r = _post(env, "/inference/quick", files=[_file()], data={"checkpoint_path": env["legacy"], "model_name": MODEL})
    assert "num_classes" in _assert_error(r, 422)


@pytest.mark.serve
@pytest.mark.ray
def test_quick_pretrained_from_weights_dir(env):
    arr = color_image("green", seed=9, size=(80, 60))
    local = Predictor.pretrained(MODEL, weights_dir=env["weights"])
    (want,) = local.predict([arr], top_k=5)
    r = _post(env, "/inference/quick", files=[_file("p.png", png_bytes(arr))],
              data={"model_name": MODEL, "num_classes": "1000", "training_job_id": "j", "top_k": "5"})
    assert r.status_code == 200, r.text
    got = r.json()
    assert [p["class_name"] for p in got["top_k_predictions"]] == [p["class_name"] for p in want["top_k_predictions"]]
    assert got["confidence"] == pytest.approx(want["confidence"], abs=1e-5)
    assert _assert_error(_post(env, "/inference/quick", files=[_file()], data={"model_name": "no_such_model_xyz"}), 422)
    assert _assert_error(_post(env, "/inference/quick", files=[_file()], data={}), 422)


# ----------------------------------------------------------------------------- allowed prefixes

@pytest.mark.serve
@pytest.mark.ray
def test_checkpoint_path_rules(env):
    def quick(path):
        return _post(env, "/inference/quick", files=[_file()], data={"checkpoint_path": path, "model_name": MODEL})

    runs = env["runs"]
    for path in (env["outside_ckpt"], env["outside"], f"{runs}/../outside/runB", f"file://{env['ckpt1']}",
                 "http://127.0.0.1:1/x", "https://example.com/ckpt", "s3://not-allowed-bucket/runs/x",
                 "gs://bucket/x", "runs/run1", "~/runs/run1", f"{runs}/run1/..", "/etc/passwd",
                 f"{runs}x/run1", "/nonexistent/dir/ckpt"):
        detail = _assert_error(quick(path), 403)
        assert "allowed" in detail or "not allowed" in detail or "absolute" in detail, (path, detail)
    assert "nope" in _assert_error(quick(f"{runs}/nope"), 404)
    assert _assert_error(quick(f"{runs}/run1/missing.pt"), 404)
    junk = os.path.join(runs, "junk")
    os.makedirs(junk, exist_ok=True)
    assert "junk" in _assert_error(quick(junk), 422)
    # A symlink inside the allowed root that leads outside it is still refused.
    link = os.path.join(runs, "sneaky")
    if not os.path.exists(link):
        os.symlink(env["outside_ckpt"], link)
    _assert_error(quick(link), 403)


# ----------------------------------------------------------------------------- hardened input

@pytest.mark.serve
@pytest.mark.ray
@pytest.mark.parametrize("kind", hi.UNDECODABLE)
def test_not_an_image_is_415(env, kind):
    name = f"upload{hi.ODD_IMAGES[kind][1]}"
    detail = _assert_error(_post(env, "/predict", files=[_file(name, hi.odd_image(kind))]), 415)
    assert name in detail


@pytest.mark.serve
@pytest.mark.ray
def test_bomb_is_413_and_empty_is_400(env):
    assert "pixels" in _assert_error(_post(env, "/predict", files=[_file("bomb.png", hi.bomb_png())]), 413)
    assert "empty" in _assert_error(_post(env, "/predict", files=[_file("e.png", b"")]), 400)
    # One bad file among good ones fails the request and names the bad one.
    files = [_file("ok.png"), _file("bad.jpg", hi.truncated_jpeg())]
    assert "bad.jpg" in _assert_error(_post(env, "/predict", files=files), 415)


@pytest.mark.serve
@pytest.mark.ray
def test_body_over_limit_is_413(env):
    big = os.urandom(MAX_UPLOAD_MB * 1024 * 1024 + 1000)
    try:
        r = _post(env, "/predict", files=[_file("big.png", big)])
        _assert_error(r, 413)
    except requests.exceptions.ConnectionError:
        pytest.fail("server closed the connection instead of answering 413")

    # No Content-Length (chunked): the limit is enforced while streaming.
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()

    def chunks():
        yield head
        for _ in range(MAX_UPLOAD_MB * 4 + 4):
            yield b"\0" * (256 * 1024)
        yield f"\r\n--{boundary}--\r\n".encode()

    r = env["s"].post(env["url"] + "/predict", data=chunks(), timeout=60,
                      headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert "Content-Length" not in r.request.headers
    _assert_error(r, 413)


@pytest.mark.serve
@pytest.mark.ray
@pytest.mark.parametrize("top_k", ["0", "-1", "abc", "1.5", "1e3", " "])
def test_bad_top_k_is_422(env, top_k):
    r = _post(env, "/predict", files=[_file()], data={"top_k": top_k})
    if top_k.strip() == "":
        assert r.status_code == 200  # blank means the default
    else:
        assert "top_k" in _assert_error(r, 422)


@pytest.mark.serve
@pytest.mark.ray
def test_top_k_is_clamped(env):
    for k in ("3", "4", "1000", "99999999999999999999"):
        r = _post(env, "/predict", files=[_file()], data={"top_k": k})
        assert r.status_code == 200, r.text
        assert len(r.json()["top_k_predictions"]) == 3


@pytest.mark.serve
@pytest.mark.ray
def test_missing_file_field_is_422(env):
    assert "file" in _assert_error(_post(env, "/predict", data={"top_k": "3"}, files=[("other", ("a.png", b"x"))]), 422)
    assert "file" in _assert_error(_post(env, "/predict", data={"top_k": "3"}), 422)
    assert _assert_error(env["s"].post(env["url"] + "/predict", json={"file": "x"}, timeout=30), 422)
    assert "file" in _assert_error(_post(env, "/predict", data={"file": "not-a-file"}, files=[("x", ("a", b"1"))]), 422)


@pytest.mark.serve
@pytest.mark.ray
@pytest.mark.parametrize("kind", hi.DECODABLE)
def test_odd_but_valid_images_are_200(env, kind):
    r = _post(env, "/predict", files=[_file(f"odd{hi.ODD_IMAGES[kind][1]}", hi.odd_image(kind))], data={"top_k": "2"})
    assert r.status_code == 200, r.text
    assert r.json()["predicted_class"] in CLASSES


@pytest.mark.serve
@pytest.mark.ray
def test_unknown_route_and_method_are_json(env):
    assert _assert_error(env["s"].get(env["url"] + "/nope", timeout=10), 404)
    assert _assert_error(env["s"].get(env["url"] + "/predict", timeout=10), 405)


@pytest.mark.serve
@pytest.mark.ray
@pytest.mark.slow
def test_serve_matches_raytimm_evaluate_predictions(env, tmp_path):
    """Train with engine.fit, run `raytimm evaluate --predictions`, then ask the server about every val image."""
    import subprocess
    import sys

    from raytimm.config import config_from_dict
    from raytimm.data.demo import make_demo_dataset
    from raytimm.engine import fit

    data = make_demo_dataset(tmp_path / "data", classes=3, per_class=12, size=32)
    cfg = config_from_dict({
        "data": {"path": str(data), "num_workers": 0, "rrc": False, "hflip": 0.0, "color_jitter": 0.0},
        "model": {"name": MODEL, "img_size": 32},
        "train": {"epochs": 2, "batch_size": 8, "lr": 0.01, "warmup_epochs": 0, "seed": 0, "threads": 1},
        "storage": {"path": env["runs"]}, "run": {"name": "engine_run"}, "mlflow": {"enabled": False}})
    fit(cfg)
    run_dir = os.path.join(env["runs"], "engine_run")
    csv_path = tmp_path / "pred.csv"
    cli = [sys.executable, "-c", "import sys; from raytimm.cli import main; sys.exit(main())"]
    proc = subprocess.run(cli + ["evaluate", "--checkpoint", run_dir, "--data", str(data),
                                 "--predictions", str(csv_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import csv
    rows = list(csv.DictReader(open(csv_path)))
    assert rows
    files = [_file(os.path.basename(r["file"]), open(os.path.join(data, r["file"]), "rb").read()) for r in rows]
    r = _post(env, "/inference/quick", files=files, data={"checkpoint_path": run_dir, "model_name": MODEL, "top_k": "1"})
    assert r.status_code == 200, r.text
    results = r.json()["results"] if len(rows) > 1 else [r.json()]
    for row, got in zip(rows, results):
        assert got["predicted_class"] == row["predicted"], row["file"]
        assert abs(got["confidence"] - float(row["confidence"])) <= 1e-5, row["file"]


# ----------------------------------------------------------------------------- hot reload (last: changes the model)

@pytest.mark.serve
@pytest.mark.ray
def test_hot_reload_under_load_has_zero_failures(env):
    stop = threading.Event()
    answers, failures = [], []
    image = png_bytes(color_image("red", seed=42))

    def hammer():
        s = requests.Session()
        s.headers["Authorization"] = f"Bearer {TOKEN}"
        while not stop.is_set():
            try:
                r = s.post(env["url"] + "/predict", files=[_file("r.png", image)], timeout=60)
                (answers if r.status_code == 200 else failures).append(
                    r.json()["predicted_class"] if r.status_code == 200 else (r.status_code, r.text))
            except requests.RequestException as e:
                failures.append(repr(e))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        while len(answers) < 8 and not failures:
            time.sleep(0.1)
        replica = env["s"].get(env["url"] + "/model", timeout=10).json()["replica"]
        deploy(env["args"].model_copy(update={"checkpoint": env["ckpt2"]}))
        deadline = time.monotonic() + 120
        while env["s"].get(env["url"] + "/model", timeout=10).json()["checkpoint"] != env["ckpt2"]:
            assert time.monotonic() < deadline, "reload did not happen"
            time.sleep(0.2)
        n = len(answers)
        while len(answers) < n + 8 and not failures:
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert failures == []
    # In place: the same replica reconfigured, not a rolling restart.
    assert env["s"].get(env["url"] + "/model", timeout=10).json()["replica"] == replica
    assert answers[0] == "red" and answers[-1] == "RED" and set(answers) == {"red", "RED"}


@pytest.mark.serve
@pytest.mark.ray
def test_failed_reload_keeps_old_model_and_reports(env):
    bad = os.path.join(env["runs"], "broken", "checkpoint_000009")
    ckpt.save_checkpoint(bad, model_state={"w": torch.zeros(2)}, meta=ckpt.load_meta(env["ckpt1"]))
    deploy(env["args"].model_copy(update={"checkpoint": bad}))
    deadline = time.monotonic() + 120
    while True:
        meta = env["s"].get(env["url"] + "/model", timeout=10).json()
        if meta["reload_error"]:
            break
        assert time.monotonic() < deadline, "reload error was never reported"
        time.sleep(0.2)
    assert meta["reload_error"]["checkpoint"] == bad and "does not fit" in meta["reload_error"]["error"]
    assert meta["checkpoint"] == env["ckpt2"]
    r = _post(env, "/predict", files=[_file()])
    assert r.status_code == 200 and r.json()["predicted_class"] == "RED"
    assert requests.get(env["url"] + "/healthz", timeout=10).status_code == 200
    # Going back to the served checkpoint clears the error.
    deploy(env["args"].model_copy(update={"checkpoint": env["ckpt2"]}))
    deadline = time.monotonic() + 120
    while env["s"].get(env["url"] + "/model", timeout=10).json()["reload_error"]:
        assert time.monotonic() < deadline, "reload error was never cleared"
        time.sleep(0.2)


def test_serve_args_parse_cli_style():
    args = ServeArgs.model_validate({"checkpoint": "/x", "allow": "s3://a/p,/data/runs", "replicas": "2"})
    assert args.allow == ["s3://a/p", "/data/runs"] and args.replicas == 2


def test_token_never_in_repr():
    args = ServeArgs(checkpoint="/x", api_token=TOKEN)
    assert TOKEN not in repr(args) and TOKEN not in str(args) and TOKEN not in repr(args.token())
    assert json.dumps(check_checkpoint_path("s3://b/x/y", ["s3://b"])) == '"s3://b/x/y"'


def test_top_k_parsing():
    assert parse_top_k(None) == 5 and parse_top_k(" 7 ") == 7 and parse_top_k("+2") == 2
    assert parse_top_k("9" * 40) >= 10 ** 9  # clamped later, never an overflow
    for bad in ("0", "-3", "x", "2.0", "1e2", "0x10"):
        with pytest.raises(HTTPError) as e:
            parse_top_k(bad)
        assert e.value.status == 422


def test_allowed_prefix_rules_are_syntactic(tmp_path):
    allowed = [normalize_prefix(str(tmp_path / "runs")), normalize_prefix("s3://bucket/models")]
    ok = check_checkpoint_path(str(tmp_path / "runs" / "a" / "b"), allowed)
    assert ok == str(tmp_path / "runs" / "a" / "b")  # nothing needs to exist
    assert check_checkpoint_path("s3://bucket/models/x", allowed) == "s3://bucket/models/x"
    for bad in (str(tmp_path / "runs2"), str(tmp_path / "runs" / ".." / "x"), "s3://bucket/models2/x",
                "s3://bucket/x", "r2://bucket/models/x", "file://" + str(tmp_path / "runs" / "a"),
                "http://bucket/models", "relative/runs", "~/x", str(tmp_path / "runs") + "\x00"):
        with pytest.raises(HTTPError) as e:
            check_checkpoint_path(bad, allowed)
        assert e.value.status == 403, bad


def test_storage_root_defaults(tmp_path):
    path = make_trained_checkpoint(tmp_path / "runs" / "r1", steps=1)
    assert storage_root(path) == str(tmp_path / "runs")
    assert storage_root(str(tmp_path / "runs" / "r1")) == str(tmp_path / "runs")
    from raytimm.checkpoint import resolve_checkpoint
    assert storage_root(resolve_checkpoint(str(tmp_path / "runs" / "r1"))) == str(tmp_path / "runs")  # build_app's call


def test_serve_yaml_is_a_valid_serve_config():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    path = os.path.join(os.path.dirname(__file__), "..", "configs", "serve.yaml")
    with open(path) as f:
        raw = yaml.safe_load(f)
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert app.import_path == "raytimm.serve:build_app"
    args = ServeArgs.model_validate(app.args)
    assert args.checkpoint.startswith("s3://")
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {ModelServer.name, Ingress.name}
    model = deployments["ModelServer"]
    assert model.autoscaling_config["max_replicas"] >= model.autoscaling_config["min_replicas"] >= 1
    assert model.ray_actor_options.num_cpus > 0 and model.ray_actor_options.num_gpus is not None
    assert set(model.user_config) >= {"checkpoint", "max_batch_size", "batch_wait_ms"}
    assert "TOKEN" not in open(path).read().replace("RAYTIMM_API_TOKEN", "")

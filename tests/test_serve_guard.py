"""What a request may make the server build, and the HTTP API fuzzed against its own OpenAPI document.

Unit tests (no Ray): the pretrained-mode guard (serve/pretrained.py), parameter counts on the meta
device, the replica-fit arithmetic (serve/capacity.py). Serve tests: one Ray + Serve for the module
with a token, a weights folder and the default allow list; giant-model requests answered 4xx with the
model replica's memory unchanged; schemathesis over /openapi.json.
"""
import concurrent.futures as cf
import os
import re
from pathlib import Path

import pytest
import requests
import yaml

from raytimm.serve.capacity import fit_error, replica_range, shortfalls
from raytimm.serve.http import HTTPError
from raytimm.serve.pretrained import (SHIPPED_TARGETS, check_model_size, check_pretrained_request, is_allowed,
                                      param_count)
from raytimm.serve.settings import ServeArgs
from tests.helpers_serve import bearer_session, local_serve
from tests.test_predict import MODEL, color_image, make_trained_checkpoint, png_bytes

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "guard-token-0123456789"
GIANTS = ["vit_gigantic_patch14_clip_224", "eva02_enormous_patch14_clip_224", "convnext_xxlarge",
          "vit_huge_patch14_clip_224"]


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1))


def _refused(fn, status: int) -> str:
    with pytest.raises(HTTPError) as e:
        fn()
    assert e.value.status == status, e.value.detail
    return e.value.detail


# ----------------------------------------------------------------------------- the guard, without a server

def test_shipped_targets_are_the_configs_in_configs_train():
    names = {yaml.safe_load(p.read_text())["model"]["name"] for p in (ROOT / "configs" / "train").glob("*.yaml")}
    assert names == SHIPPED_TARGETS


@pytest.mark.parametrize("name", ["resnet18;rm -rf /", "resnet18 ; ls", "resnet18\nresnet50", "../resnet18",
                                  "resnet18/../x", "hf-hub:timm/resnet18.a1_in1k", "resnet18 ", "$(id)",
                                  "no_such_model_xyz", "", "r" * 101])
def test_names_that_are_not_timm_names_are_422(name, tmp_path):
    (tmp_path / "resnet18.safetensors").write_bytes(b"")
    detail = _refused(lambda: check_pretrained_request(name, allow_models=["*"], max_params=10**12,
                                                       weights_dir=str(tmp_path), allow_hub=True), 422)
    assert "not a timm model" in detail


def test_allow_list_default_is_targets_plus_local_weights(tmp_path):
    (tmp_path / "convnext_xxlarge.safetensors").write_bytes(b"")
    assert is_allowed("resnet50", [], None) and is_allowed("resnet50.a1_in1k", [], None)
    assert is_allowed("convnext_xxlarge", [], str(tmp_path)) and not is_allowed("convnext_xxlarge", [], None)
    assert not is_allowed("vit_gigantic_patch14_clip_224", [], str(tmp_path))
    # An explicit list replaces the default; '*' allows every timm name (the size ceiling still applies).
    assert not is_allowed("resnet50", ["resnet18"], str(tmp_path))
    assert is_allowed("resnet18.tv_in1k", ["resnet18"], None)
    assert is_allowed("vit_gigantic_patch14_clip_224", ["*"], None)


def test_guard_order_and_answers(tmp_path):
    weights = tmp_path / "w"
    weights.mkdir()
    (weights / "resnet18.safetensors").write_bytes(b"")
    (weights / "convnext_xxlarge.safetensors").write_bytes(b"")

    def check(name, **kw):
        opts = dict(allow_models=[], max_params=100_000_000, weights_dir=str(weights), allow_hub=False)
        return check_pretrained_request(name, **{**opts, **kw})

    assert check("resnet18") == str(weights / "resnet18.safetensors")
    assert "not allowed" in _refused(lambda: check("vit_gigantic_patch14_clip_224"), 422)
    detail = _refused(lambda: check("resnet34"), 404)  # a target without weights, hub off
    assert "resnet34.safetensors" in detail and "--allow-hub" in detail
    assert check("resnet34", allow_hub=True) is None  # None: the hub may be used
    assert "--max-model-params" in _refused(lambda: check("convnext_xxlarge"), 422)  # allowed, but too large
    assert "not a timm model" in _refused(lambda: check("resnet18;rm -rf /"), 422)


def test_parameter_counts_allocate_nothing():
    """Sizing a 1.8-billion-parameter model (7 GB of float32) on the meta device leaves resident memory flat."""
    param_count("resnet18")  # imports and first-use allocations out of the way
    before = _rss_kib(os.getpid())
    count = param_count("vit_gigantic_patch14_clip_224")
    grown_mib = (_rss_kib(os.getpid()) - before) / 1024
    assert count > 1_800_000_000
    assert grown_mib < 100, f"resident memory grew {grown_mib:.0f} MiB while sizing"
    assert param_count("resnet18") == 11_689_512  # the known figure, and the cache answers the same
    assert param_count("vit_base_patch16_224") < 100_000_000  # the largest shipped target fits the default


def test_every_shipped_target_fits_the_default_ceiling():
    for name in sorted(SHIPPED_TARGETS):
        assert check_model_size(name, ServeArgs.model_fields["max_model_params"].default) > 0


# ----------------------------------------------------------------------------- replicas that can never fit

def test_fit_arithmetic_counts_replicas_and_ingress():
    two_cpus = {"CPU": 2.0}
    assert fit_error(ServeArgs(checkpoint="/x", replicas=1), two_cpus) is None  # 1 + 0.1
    assert fit_error(ServeArgs(checkpoint="/x", replicas=3, num_cpus=0.5), two_cpus) is None  # 1.5 + 0.1
    msg = fit_error(ServeArgs(checkpoint="/x", replicas=3), two_cpus)
    assert msg and "--replicas 3" in msg and "--num-cpus 1" in msg and "3.1 CPUs" in msg and "has 2" in msg
    assert "\n" not in msg
    msg = fit_error(ServeArgs(checkpoint="/x", replicas=2, ingress_num_cpus=0.5, ingress_replicas=2), two_cpus)
    assert msg and "3 CPUs" in msg  # 2 x 1 + 2 x 0.5
    msg = fit_error(ServeArgs(checkpoint="/x", num_cpus=0.5, num_gpus=1, replicas=2), {"CPU": 8, "GPU": 1})
    assert msg and "--num-gpus 1" in msg and "2 GPUs" in msg and "CPUs" not in msg  # the CPUs fit


def test_fit_with_autoscaling_uses_min_or_initial_and_warns_for_max():
    args = ServeArgs(checkpoint="/x", num_cpus=1, autoscaling={"min_replicas": 1, "max_replicas": 4})
    assert replica_range(args) == (1, 4, "autoscaling min_replicas=1")
    errors, warnings = shortfalls(args, {"CPU": 2.0}, local=True)
    assert errors == [] and len(warnings) == 1 and "max_replicas=4" in warnings[0] and "at most 1" in warnings[0]
    args = ServeArgs(checkpoint="/x", autoscaling={"min_replicas": 1, "initial_replicas": 3, "max_replicas": 4})
    msg = fit_error(args, {"CPU": 2.0})
    assert msg and "initial_replicas=3" in msg


def test_joined_cluster_only_warns():
    errors, warnings = shortfalls(ServeArgs(checkpoint="/x", replicas=3), {"CPU": 2.0}, local=False)
    assert errors == [] and len(warnings) == 1 and "autoscaler" in warnings[0]


# ----------------------------------------------------------------------------- over HTTP

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A served checkpoint, weights for the test model and (never read) for convnext_xxlarge; default allow list."""
    import safetensors.torch
    import timm
    import torch

    from raytimm.envvars import API_TOKEN_ENV
    from raytimm.serve.app import deploy
    from raytimm.serve.server import wait_healthy

    root = tmp_path_factory.mktemp("guard")
    make_trained_checkpoint(root / "runs" / "run1", steps=1)  # what it predicts does not matter here
    weights = root / "weights"
    weights.mkdir()
    torch.manual_seed(3)
    safetensors.torch.save_file(timm.create_model(MODEL, pretrained=False).state_dict(),
                                str(weights / f"{MODEL}.safetensors"))
    (weights / "convnext_xxlarge.safetensors").write_bytes(b"not weights: the size check refuses it first")
    with local_serve(env={API_TOKEN_ENV: TOKEN}, address="local") as url:
        deploy(ServeArgs(checkpoint=str(root / "runs" / "run1"), num_cpus=0.5, ingress_num_cpus=0.1,
                         weights_dir=str(weights), max_models=2, max_upload_mb=2))
        wait_healthy(url, timeout_s=240)
        yield {"url": url, "s": bearer_session(TOKEN), "weights": str(weights), "run": str(root / "runs" / "run1")}


def _quick(env, data, session=None):
    files = [("file", ("x.png", png_bytes(color_image("red")), "image/png"))]
    return (session or env["s"]).post(env["url"] + "/inference/quick", files=files, data=data, timeout=120)


def _error(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail and "Traceback" not in r.text
    return detail


@pytest.mark.serve
@pytest.mark.ray
def test_giant_and_bogus_models_get_4xx_and_build_nothing(env):
    meta = env["s"].get(env["url"] + "/model", timeout=30).json()
    pid = meta["pid"]
    before = _rss_kib(pid)
    asks = {  # model_name -> (status, words in the detail)
        "vit_gigantic_patch14_clip_224": (422, "not allowed"),
        "eva02_enormous_patch14_clip_224": (422, "not allowed"),
        "vit_huge_patch14_clip_224": (422, "not allowed"),
        "convnext_xxlarge": (422, "--max-model-params"),  # has a (fake) weights file: allowed, but too large
        "resnet34": (404, "--allow-hub"),  # a shipped target without weights, the hub off
        "resnet18;rm -rf /": (422, "not a timm model"),
        "resnet18 && curl evil": (422, "not a timm model"),
        "not_a_model_at_all": (422, "not a timm model"),
    }
    with cf.ThreadPoolExecutor(len(asks)) as pool:
        answers = dict(zip(asks, pool.map(lambda name: _quick(env, {"model_name": name}), asks)))
    for name, (status, words) in asks.items():
        assert words in _error(answers[name], status), name
    after = _rss_kib(pid)
    assert after <= before * 1.10, f"model replica grew from {before} to {after} KiB"
    # Still serving, and the allowed model with local weights works.
    r = _quick(env, {"model_name": MODEL, "top_k": "1"})
    assert r.status_code == 200, r.text
    assert r.json()["task_type"] == "image_classification" and len(r.json()["top_k_predictions"]) == 1


@pytest.mark.serve
@pytest.mark.ray
def test_legacy_model_name_is_bounded_too(env, tmp_path):
    # A legacy .pt names its architecture in the request: sized before anything is built.
    legacy = Path(env["weights"]).parent / "runs" / "legacy.pt"
    legacy.write_bytes(b"never read")
    r = _quick(env, {"checkpoint_path": str(legacy), "model_name": "convnext_xxlarge", "num_classes": "3"})
    assert "--max-model-params" in _error(r, 422)
    r = _quick(env, {"checkpoint_path": str(legacy), "model_name": "resnet18;rm -rf /", "num_classes": "3"})
    assert "not a timm model" in _error(r, 422)


@pytest.mark.serve
@pytest.mark.ray
def test_healthz_answers_503_while_the_model_replica_cannot_be_placed(env):
    """A second app whose model replica can never be placed (64 CPUs): /healthz says so instead of hanging."""
    import time

    from ray import serve

    from raytimm.serve.app import build_app

    args = ServeArgs(checkpoint=env["run"], num_cpus=64, ingress_num_cpus=0.1)
    serve._run(build_app(args), name="pending", route_prefix="/pending", _blocking=False)  # never RUNNING
    try:
        deadline, r = time.monotonic() + 180, None
        while time.monotonic() < deadline:
            try:  # 404 until the route exists; the proxy holds requests while the ingress itself starts
                r = requests.get(env["url"] + "/pending/healthz", timeout=30)
                if r.status_code == 503:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        assert r is not None and r.status_code == 503, r and r.text
        assert r.json()["status"] == "loading" and "no model replica answered within" in r.json()["detail"]
        assert requests.get(env["url"] + "/healthz", timeout=30).status_code == 200  # the main app is unaffected
    finally:
        serve.delete("pending")


@pytest.mark.serve
@pytest.mark.ray
def test_openapi_is_behind_the_token_and_describes_the_forms(env):
    assert _error(requests.get(env["url"] + "/openapi.json", timeout=30), 401)
    doc = env["s"].get(env["url"] + "/openapi.json", timeout=30).json()
    form = doc["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["file"]["items"]["format"] == "binary" and form["required"] == ["file"]
    quick = doc["paths"]["/inference/quick"]["post"]
    assert {"model_name", "checkpoint_path", "num_classes", "top_k"} <= set(
        quick["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"])
    for code in ("401", "403", "404", "413", "415", "422", "502", "503"):
        ref = quick["responses"][code]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorBody"), code
    assert doc["components"]["schemas"]["ErrorBody"]["required"] == ["detail"]
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


# ----------------------------------------------------------------------------- fuzzing (schemathesis)

ROUTES = {("GET", "/healthz"), ("GET", "/model"), ("POST", "/predict"), ("POST", "/inference/quick")}
FUZZ_EXAMPLES = 25  # per route and phase, with a fixed seed: the same cases every run
FUZZ_CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
               "response_schema_conformance", "response_headers_conformance", "negative_data_rejection",
               "unsupported_method"]


@pytest.mark.serve
@pytest.mark.ray
def test_fuzz_http_api_against_its_openapi_document(env):
    """schemathesis (examples, coverage and fuzzing phases) over every documented route: no 5xx; each answer's
    status, content type, headers and JSON body are the documented ones; schema-violating input is refused."""
    import schemathesis
    from schemathesis.engine import Status, events, from_schema

    auth = {"Authorization": f"Bearer {TOKEN}"}
    schema = schemathesis.openapi.from_url(env["url"] + "/openapi.json", headers=auth, timeout=60)
    assert {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()} == ROUTES
    schema.config.update(base_url=env["url"], headers=auth)
    schema.config.seed = 20251203
    schema.config.generation.update(max_examples=FUZZ_EXAMPLES, deterministic=True)
    schema.config.phases.update(phases=["examples", "coverage", "fuzzing"])
    schema.config.checks.update(included_check_names=FUZZ_CHECKS)
    schema.config.cache.enabled = False  # no .schemathesis/ crash cache in the repo: every run the same cases
    failures, tested, cases = [], set(), 0
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            tested.add(event.label)
            cases += len(event.recorder.cases)
            for checks in event.recorder.checks.values():
                failures += [f"{event.label}: {c.name}: {c.failure_info.failure if c.failure_info else ''}"
                             for c in checks if c.status == Status.FAILURE]
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            failures.append(f"{type(event).__name__}: {getattr(event, 'info', event)}")
    assert failures == []
    assert tested >= {f"{m} {p}" for m, p in ROUTES if p != "/healthz"} and cases >= 50

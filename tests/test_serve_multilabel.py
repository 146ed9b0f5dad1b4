"""The multi-label path end to end over real HTTP: a model trained here on the demo manifest (engine.fit,
calibrated thresholds) -> Ray Serve -> /predict and /inference/quick answer with sigmoid scores, `labels` at
the checkpoint's thresholds or the request's `threshold`, and 422 for a bad threshold. One Ray + Serve
instance for the module, shut down at the end."""
import os

import pytest

from raytimm import checkpoint as ckpt
from raytimm.envvars import API_TOKEN_ENV
from raytimm.predict import MULTI_LABEL_TASK_TYPE, Predictor
from raytimm.serve.app import deploy
from raytimm.serve.server import wait_healthy
from raytimm.serve.settings import ServeArgs
from tests.fixtures.browser import enter_token, launch_chromium, watch_errors
from tests.helpers_serve import bearer_session, local_serve
from tests.test_predict import color_image, make_trained_checkpoint, png_bytes
from tests.test_predict_multilabel import ML_CLASSES, make_multilabel_run

TOKEN = "test-token-multilabel-0123"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from raytimm.data.manifest import read_manifest

    root = tmp_path_factory.mktemp("serve_ml")
    run, csv_path = make_multilabel_run(root, epochs=1)
    single = make_trained_checkpoint(root / "runs" / "single")  # a single-label model under the allowed prefix
    files = [e[0] for e in read_manifest(csv_path, multi_label=True)[0]][:4]
    with local_serve(env={API_TOKEN_ENV: TOKEN}) as url:
        deploy(ServeArgs(checkpoint=run, num_cpus=0.5, ingress_num_cpus=0.1, max_models=2,
                         allow=[str(root / "runs")], max_batch_size=8, batch_wait_ms=5))
        wait_healthy(url, timeout_s=180)
        yield {"url": url, "s": bearer_session(TOKEN), "run": run, "single": single, "files": files,
               "local": Predictor.from_checkpoint(run, device="cpu")}


def _post(env, path, files, data=None):
    return env["s"].post(env["url"] + path, files=[("file", (os.path.basename(f), open(f, "rb").read(), "image/png"))
                                                   for f in files], data=data, timeout=60)


def _labels(answer):
    return [(lab["class_name"], round(lab["confidence"], 5)) for lab in answer["labels"]]


@pytest.mark.serve
@pytest.mark.ray
def test_served_multi_label_model_answers_labels_at_its_thresholds_and_the_requests(env):
    local = env["local"]
    meta = env["s"].get(env["url"] + "/model", timeout=30).json()
    assert meta["multi_label"] is True and meta["thresholds"] == local.thresholds == \
        ckpt.load_meta(ckpt.read_pointer(env["run"], "best"))["thresholds"]
    assert meta["task_type"] == MULTI_LABEL_TASK_TYPE

    r = _post(env, "/predict", env["files"], {"top_k": "2"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    expected = local.predict(env["files"], top_k=2)
    assert len(results) == len(expected) == len(env["files"])
    for got, want in zip(results, expected):
        assert set(got) == {"task_type", "top_k_predictions", "predicted_class", "confidence", "labels"}
        assert got["task_type"] == MULTI_LABEL_TASK_TYPE
        assert [p["class_name"] for p in got["top_k_predictions"]] == [p["class_name"] for p in want["top_k_predictions"]]
        scores = [p["confidence"] for p in got["top_k_predictions"]]
        assert scores == sorted(scores, reverse=True) and got["confidence"] == scores[0]
        assert got["predicted_class"] == got["top_k_predictions"][0]["class_name"]
        assert _labels(got) == _labels(want)
        for lab in got["labels"]:
            assert lab["confidence"] >= local.thresholds[lab["class_id"]]

    # The request's threshold replaces the stored ones: 0 -> every label, on both routes.
    r = _post(env, "/predict", env["files"][:1], {"threshold": "0"})
    assert r.status_code == 200, r.text
    assert sorted(lab["class_id"] for lab in r.json()["labels"]) == list(range(ML_CLASSES))
    r = _post(env, "/inference/quick", env["files"][:1], {"checkpoint_path": env["run"], "threshold": "0.999999"})
    assert r.status_code == 200, r.text
    want = local.predict(env["files"][:1], threshold=0.999999)[0]
    assert r.json()["task_type"] == MULTI_LABEL_TASK_TYPE and _labels(r.json()) == _labels(want)


@pytest.mark.serve
@pytest.mark.ray
@pytest.mark.parametrize("bad", ["1.5", "-0.2", "abc", "nan", "", "0.5,0.6"])
def test_a_bad_threshold_is_422_naming_the_field(env, bad):
    r = _post(env, "/predict", env["files"][:1], {"threshold": bad})
    assert r.status_code == 422, r.text
    assert "threshold must be a number between 0 and 1" in r.json()["detail"]


@pytest.mark.serve
@pytest.mark.ray
def test_a_single_label_model_answers_as_before_and_refuses_a_threshold(env):
    red = [("file", ("red.png", png_bytes(color_image("red", seed=3)), "image/png"))]
    r = env["s"].post(env["url"] + "/inference/quick", files=red, data={"checkpoint_path": env["single"]}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["task_type"] == "image_classification" and "labels" not in r.json()
    r = env["s"].post(env["url"] + "/inference/quick", files=red,
                      data={"checkpoint_path": env["single"], "threshold": "0.5"}, timeout=60)
    assert r.status_code == 422, r.text
    assert "single-label model" in r.json()["detail"]


@pytest.mark.serve
@pytest.mark.ray
@pytest.mark.e2e
def test_the_page_shows_a_multi_label_models_label_set(env, playwright, tmp_path):
    """In chromium: the page says the model is multi-label, and an uploaded image's bars and its labels
    at the checkpoint's thresholds are the ones /predict answers."""
    from playwright.sync_api import expect

    answers = {f: _post(env, "/predict", [f], {"top_k": "5"}).json() for f in env["files"]}
    # An image with at least one label over its threshold, so the list shows real entries (else "none").
    image = next((f for f, a in answers.items() if a["labels"]), env["files"][0])
    api = answers[image]
    browser = launch_chromium(playwright)
    try:
        page = browser.new_page(viewport={"width": 1000, "height": 800})
        errors = watch_errors(page)
        page.goto(env["url"] + "/")
        enter_token(page, TOKEN)
        expect(page.locator("#model-info")).to_contain_text(f"multi-label, {ML_CLASSES} classes")
        page.set_input_files("#file", image)
        expect(page.locator("#bars .bar")).to_have_count(len(api["top_k_predictions"]))
        assert page.locator("#bars .bar-label").all_inner_texts() == [p["class_name"] for p in api["top_k_predictions"]]
        expect(page.locator("#labels")).to_be_visible()
        want = [f"{lab['class_name']} ({100 * lab['confidence']:.1f} %)" for lab in api["labels"]] or ["none"]
        expect(page.locator("#label-list li")).to_have_text(want)
        page.screenshot(path=str(tmp_path / "page-multi-label.png"), full_page=True)
        assert (tmp_path / "page-multi-label.png").stat().st_size > 10_000
    finally:
        browser.close()
    assert errors == []

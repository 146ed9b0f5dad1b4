"""Predictor on a multi-label checkpoint (no Ray): sigmoid scores, labels at meta.json's thresholds, a per-call
threshold, both backends (torch and ONNX Runtime) answering alike; the threshold field's parsing."""
import copy
import math
import os

import numpy as np
import pytest
import torch

from raytimm import checkpoint as ckpt
from raytimm.errors import CheckpointError, ConfigError
from raytimm.predict import MULTI_LABEL_TASK_TYPE, TASK_TYPE, Predictor
from raytimm.serve.http import HTTPError, error_status, parse_threshold

ML_CLASSES = 3


def make_multilabel_run(root, *, epochs: int = 2) -> tuple[str, str]:
    """Train a tiny multi-label model on demo shapes with calibrated thresholds; (run folder, manifest CSV)."""
    from raytimm.config import config_from_dict
    from raytimm.data.demo import make_demo_multilabel
    from raytimm.engine import fit

    csv_path = make_demo_multilabel(root / "data", classes=ML_CLASSES, images=60, size=32, seed=4)
    cfg = config_from_dict({
        "data": {"path": csv_path, "format": "manifest", "multi_label": True, "num_workers": 0, "rrc": False,
                 "hflip": 0.0, "color_jitter": 0.0},
        "model": {"name": "test_resnet", "img_size": 32},
        "train": {"epochs": epochs, "batch_size": 8, "lr": 0.01, "warmup_epochs": 0, "seed": 0, "threads": 1,
                  "calibrate_thresholds": True},
        "storage": {"path": str(root / "runs")}, "run": {"name": "ml"}, "mlflow": {"enabled": False}})
    fit(cfg)
    return str(root / "runs" / "ml"), csv_path


@pytest.fixture(scope="module")
def ml(tmp_path_factory):
    run, csv_path = make_multilabel_run(tmp_path_factory.mktemp("mlpred"))
    from raytimm.data.manifest import read_manifest

    files = [e[0] for e in read_manifest(csv_path, multi_label=True)[0]][:6]
    return {"run": run, "best": ckpt.read_pointer(run, "best"), "files": files}


def _expected_labels(scores, thresholds, class_names):
    hits = sorted((j for j in range(len(class_names)) if scores[j] >= thresholds[j]), key=lambda j: -scores[j])
    return [class_names[j] for j in hits]


def test_multi_label_predictor_scores_with_sigmoid_and_answers_labels_at_its_thresholds(ml):
    pred = Predictor.from_checkpoint(ml["run"], device="cpu")
    meta = ckpt.load_meta(ml["best"])
    assert pred.multi_label and pred.thresholds == meta["thresholds"] and pred.num_classes == ML_CLASSES
    batch = torch.stack([pred.preprocess(pred.decode(f)) for f in ml["files"]])
    scores = torch.sigmoid(pred.logits(batch))
    assert not torch.allclose(scores.sum(dim=1), torch.ones(len(ml["files"])))  # not a softmax
    out = pred.predict(ml["files"], top_k=2)
    for row, answer in zip(scores.tolist(), out):
        assert answer["task_type"] == MULTI_LABEL_TASK_TYPE
        top = sorted(range(ML_CLASSES), key=lambda j: -row[j])[:2]
        assert [p["class_id"] for p in answer["top_k_predictions"]] == top
        assert answer["predicted_class"] == pred.class_names[top[0]]
        assert answer["confidence"] == pytest.approx(row[top[0]], abs=1e-6)
        assert [lab["class_name"] for lab in answer["labels"]] == _expected_labels(row, pred.thresholds,
                                                                                 pred.class_names)
        for lab in answer["labels"]:
            assert lab["confidence"] == pytest.approx(row[lab["class_id"]], abs=1e-6)
            assert lab["class_name"] == pred.class_names[lab["class_id"]]
    # A per-call threshold replaces every label's: 0 gives all labels, 1 only scores of exactly 1.
    assert all(len(a["labels"]) == ML_CLASSES for a in pred.predict(ml["files"], threshold=0.0))
    assert all(all(lab["confidence"] >= 1.0 for lab in a["labels"]) for a in pred.predict(ml["files"], threshold=1))
    mid = pred.predict(ml["files"], threshold=0.3)
    for row, answer in zip(scores.tolist(), mid):
        assert [lab["class_name"] for lab in answer["labels"]] == _expected_labels(row, [0.3] * ML_CLASSES,
                                                                                 pred.class_names)
    # Serve's batched path: thresholds per row.
    rows = pred.predict_tensor_batch(batch[:2], [1, 1], [0.0, None])
    assert len(rows[0]["labels"]) == ML_CLASSES and rows[1]["labels"] == out[1]["labels"]
    meta_out = pred.metadata()
    assert meta_out["multi_label"] is True and meta_out["thresholds"] == pred.thresholds
    assert meta_out["task_type"] == MULTI_LABEL_TASK_TYPE


@pytest.mark.parametrize("bad", [-0.01, 1.5, math.nan, math.inf, "0.5", True, None])
def test_a_threshold_outside_0_1_is_refused(ml, bad):
    pred = Predictor.from_checkpoint(ml["best"], device="cpu")
    if bad is None:
        assert pred.label_thresholds(None) == pred.thresholds
        return
    with pytest.raises(ConfigError, match="threshold must be a number between 0 and 1"):
        pred.predict(ml["files"][:1], threshold=bad)


def test_single_label_predictor_is_unchanged_and_refuses_a_threshold(tmp_path):
    from tests.test_predict import color_image, make_trained_checkpoint

    pred = Predictor.from_checkpoint(make_trained_checkpoint(tmp_path / "run"), device="cpu")
    out = pred.predict([color_image("red", seed=1)], top_k=2)[0]
    assert not pred.multi_label and pred.thresholds is None
    assert out["task_type"] == TASK_TYPE and "labels" not in out
    assert sum(p["confidence"] for p in pred.predict([color_image("red", seed=1)], top_k=3)[0]["top_k_predictions"]) \
        == pytest.approx(1.0, abs=1e-5)  # softmax
    with pytest.raises(ConfigError, match="single-label model") as e:
        pred.predict([color_image("red", seed=1)], threshold=0.5)
    assert error_status(e.value) == 422


def test_wrong_thresholds_in_meta_json_are_a_checkpoint_error(ml, tmp_path):
    meta = ckpt.load_meta(ml["best"])
    state = ckpt.load_model_state(ml["best"])
    for bad, needle in (([0.5] * (ML_CLASSES - 1), "2 thresholds for 3 classes"), ([0.5, 2.0, 0.5], "2.0"),
                        ("high", "thresholds")):
        path = str(tmp_path / f"c{len(str(bad))}")
        ckpt.save_checkpoint(path, model_state=state, meta={**copy.deepcopy(meta), "thresholds": bad})
        with pytest.raises(CheckpointError, match=needle):
            Predictor.from_checkpoint(path, device="cpu")
    path = str(tmp_path / "none")  # no thresholds stored: 0.5 per label, the documented default
    ckpt.save_checkpoint(path, model_state=state, meta={k: v for k, v in meta.items() if k != "thresholds"})
    assert Predictor.from_checkpoint(path, device="cpu").thresholds == [0.5] * ML_CLASSES


def test_onnx_backend_answers_like_torch_on_a_multi_label_checkpoint(ml, tmp_path):
    pytest.importorskip("onnxruntime")
    torch_pred = Predictor.from_checkpoint(ml["best"], device="cpu")
    onnx_pred = Predictor.from_checkpoint(ml["best"], backend="onnx", cache_dir=str(tmp_path / "cache"),
                                          num_threads=1)
    assert onnx_pred.backend == "onnx" and onnx_pred.multi_label and onnx_pred.thresholds == torch_pred.thresholds
    a, b = torch_pred.predict(ml["files"], top_k=ML_CLASSES), onnx_pred.predict(ml["files"], top_k=ML_CLASSES)
    for x, y in zip(a, b):
        assert y["task_type"] == MULTI_LABEL_TASK_TYPE
        assert {p["class_name"]: p["confidence"] for p in y["top_k_predictions"]} == pytest.approx(
            {p["class_name"]: p["confidence"] for p in x["top_k_predictions"]}, abs=1e-4)
        # A score within the parity tolerance of its threshold could flip; none of these is that close.
        near = [p for p in x["top_k_predictions"] if abs(p["confidence"] - torch_pred.thresholds[p["class_id"]]) < 1e-4]
        if not near:
            assert [lab["class_name"] for lab in y["labels"]] == [lab["class_name"] for lab in x["labels"]]


def test_threshold_form_field_parsing():
    assert parse_threshold({}) is None
    assert parse_threshold({"threshold": " 0.25 "}) == 0.25
    assert parse_threshold({"threshold": "1"}) == 1.0 and parse_threshold({"threshold": "0"}) == 0.0
    assert parse_threshold({"threshold": ".5"}) == 0.5 and parse_threshold({"threshold": "5e-1"}) == 0.5
    for bad in ("", " ", "-0.1", "1.01", "abc", "nan", "inf", "0x1", "1e999", "0.5.1", "1" * 50, object()):
        with pytest.raises(HTTPError) as e:
            parse_threshold({"threshold": bad})
        assert e.value.status == 422 and "threshold must be a number between 0 and 1" in e.value.detail


def test_batch_predict_stages_write_the_predictors_label_sets(ml):
    """raytimm predict's two Ray Data stages (decode, model actor), called in-process on a multi-label checkpoint:
    each row's `labels` column is the Predictor's label set at the stored thresholds; a bad file stays an error row."""
    from raytimm.batch_predict import ModelActor, decode_batch

    pred = Predictor.from_checkpoint(ml["run"], device="cpu")
    uris = list(ml["files"]) + [ml["files"][0] + ".missing"]
    batch = {"index": np.arange(len(uris)), "path": np.asarray(uris, dtype=object), "uri": np.asarray(uris, dtype=object),
             "size": np.asarray([os.path.getsize(u) if os.path.exists(u) else 0 for u in uris])}
    decoded = decode_batch(batch, data_config=pred.data_config, max_pixels=None, max_bytes=1 << 20)
    actor = ModelActor(ml["run"], backend="torch", top_k=2, device="cpu", num_threads=1, model_name=None,
                       num_classes=None)
    table = actor(decoded).to_pylist()
    expected = pred.predict(ml["files"], top_k=2)
    assert [r["labels"] for r in table[:-1]] == [[p["class_name"] for p in e["labels"]] for e in expected]
    assert [r["predicted_class"] for r in table[:-1]] == [e["predicted_class"] for e in expected]
    assert table[-1]["labels"] is None and table[-1]["error"]

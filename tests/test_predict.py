"""Predictor and evaluate_checkpoint on checkpoints made in the test (tiny timm models, CPU).

``make_trained_checkpoint`` is shared with test_serve.py: a test_resnet taught in a few seconds to
tell solid red, green and blue images apart with high confidence.
"""
import csv
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from raytimm import checkpoint as ckpt
from raytimm.data.images import decode_image
from raytimm.data.transforms import build_eval_transform
from raytimm.errors import CheckpointError, ConfigError, DataError
from raytimm.predict import Predictor, evaluate_checkpoint, imagenet_class_names

MODEL = "test_resnet"
CLASSES = ["blue", "green", "red"]  # ImageFolder order (sorted)
COLORS = {"blue": (20, 40, 230), "green": (30, 220, 40), "red": (230, 30, 30)}
DATA_CONFIG = {"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
               "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}


def color_image(name: str, seed: int = 0, size=(40, 36)) -> np.ndarray:
    """A noisy solid-colour RGB array of class `name`."""
    rng = np.random.default_rng(seed)
    base = np.array(COLORS[name], dtype=np.int16)
    noise = rng.integers(-25, 26, (size[1], size[0], 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def png_bytes(arr: np.ndarray) -> bytes:
    import io
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def train_color_model(steps: int = 40, seed: int = 0) -> torch.nn.Module:
    """test_resnet trained briefly on noisy solid colours (deterministic)."""
    torch.manual_seed(seed)
    model = timm.create_model(MODEL, pretrained=False, num_classes=len(CLASSES))
    transform = build_eval_transform(DATA_CONFIG)
    xs, ys = [], []
    for i in range(48):
        label = i % len(CLASSES)
        xs.append(transform(color_image(CLASSES[label], seed=1000 + i)))
        ys.append(label)
    x, y = torch.stack(xs), torch.tensor(ys)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def make_trained_checkpoint(run_dir, name: str = "checkpoint_000001", steps: int = 40, seed: int = 0) -> str:
    """Save a trained colour model as a checkpoint in run_dir and point run_dir/best at it."""
    model = train_color_model(steps=steps, seed=seed)
    path = os.path.join(str(run_dir), name)
    ckpt.save_checkpoint(path, model_state=model.state_dict(), meta={
        "model_name": MODEL, "num_classes": len(CLASSES), "class_names": CLASSES, "data_config": DATA_CONFIG,
        "epoch": 1, "metrics": {"val/top1": 100.0}, "config": {"model": {"name": MODEL}}})
    ckpt.write_best_pointer(str(run_dir), path, {"val/top1": 100.0})
    return path


def save_upper_case_copy(checkpoint: str, path: str) -> str:
    """The same weights under upper-case class names (a hot reload to it shows in every answer)."""
    ckpt.save_checkpoint(path, model_state=ckpt.load_model_state(checkpoint),
                         meta={**ckpt.load_meta(checkpoint), "class_names": [c.upper() for c in CLASSES]})
    return path


def write_imagefolder(root, per_class_train: int = 2, per_class_val: int = 3) -> str:
    """A tiny ImageFolder with train/ and val/ of noisy colour PNGs."""
    for split, n in (("train", per_class_train), ("val", per_class_val)):
        for ci, cls in enumerate(CLASSES):
            d = Path(root) / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(color_image(cls, seed=ci * 100 + i + (50 if split == "val" else 0))).save(d / f"{i}.png")
    return str(root)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    path = make_trained_checkpoint(run)
    return {"run": str(run), "checkpoint": path}


def _direct_probs(model, data_config, arrays):
    transform = build_eval_transform(data_config)
    with torch.inference_mode():
        return torch.softmax(model(torch.stack([transform(a) for a in arrays])), dim=1)


def test_predict_matches_direct_forward_in_order(trained):
    pred = Predictor.from_checkpoint(trained["checkpoint"])
    assert pred.class_names == CLASSES and pred.num_classes == 3 and not pred.model.training
    arrays = [color_image(c, seed=7 + i) for i, c in enumerate(["red", "blue", "green", "red", "blue"])]
    out = pred.predict(arrays, top_k=2)
    assert [r["predicted_class"] for r in out] == ["red", "blue", "green", "red", "blue"]
    model = timm.create_model(MODEL, num_classes=3)
    model.load_state_dict(ckpt.load_model_state(trained["checkpoint"]))
    probs = _direct_probs(model.eval(), DATA_CONFIG, arrays)
    for row, r in zip(probs, out):
        assert r["task_type"] == "image_classification"
        assert [p["class_id"] for p in r["top_k_predictions"]] == torch.topk(row, 2).indices.tolist()
        assert r["confidence"] == pytest.approx(float(row.max()), abs=1e-5)
        assert r["top_k_predictions"][0]["class_name"] == r["predicted_class"]
        assert set(r["top_k_predictions"][0]) == {"class_id", "class_name", "confidence"}
    assert min(r["confidence"] for r in out) > 0.8  # the model really learnt the colours


def test_bytes_paths_and_run_folder_give_same_answer(trained, tmp_path):
    pred_run = Predictor.from_checkpoint(trained["run"])  # via the best pointer
    assert pred_run.source == trained["checkpoint"]
    arr = color_image("green", seed=3)
    (tmp_path / "g.png").write_bytes(png_bytes(arr))
    a, b, c = pred_run.predict([arr, png_bytes(arr), str(tmp_path / "g.png")], top_k=3)
    assert a == b == c


def test_top_k_is_clamped_and_batches_split(trained):
    pred = Predictor.from_checkpoint(trained["checkpoint"], batch_size=2)
    arrays = [color_image(c, seed=i) for i, c in enumerate(CLASSES * 2)]
    out = pred.predict(arrays, top_k=50)
    assert all(len(r["top_k_predictions"]) == 3 for r in out)
    assert [r["predicted_class"] for r in out] == CLASSES * 2
    assert sum(p["confidence"] for p in out[0]["top_k_predictions"]) == pytest.approx(1.0, abs=1e-5)
    assert len(pred.predict(arrays[:1], top_k=0)[0]["top_k_predictions"]) == 1


def test_metadata_for_model_endpoint(trained):
    meta = Predictor.from_checkpoint(trained["run"]).metadata()
    assert meta["model_name"] == MODEL and meta["class_names"] == CLASSES
    assert meta["checkpoint"] == trained["checkpoint"] and meta["metrics"] == {"val/top1": 100.0}
    assert meta["data_config"]["input_size"] == [3, 32, 32]


def test_pretrained_from_weights_dir(tmp_path, monkeypatch):
    torch.manual_seed(1)
    reference = timm.create_model(MODEL, pretrained=False).eval()  # 1000 ImageNet classes
    import safetensors.torch
    safetensors.torch.save_file(reference.state_dict(), str(tmp_path / f"{MODEL}.safetensors"))
    monkeypatch.setenv("RAYTIMM_WEIGHTS_DIR", str(tmp_path))
    pred = Predictor.pretrained(MODEL)
    assert pred.num_classes == 1000 and pred.class_names[:2] == ["tench", "goldfish"]
    assert pred.class_names == imagenet_class_names()
    arr = color_image("red", size=(64, 64))
    (res,) = pred.predict([arr], top_k=3)
    probs = _direct_probs(reference, pred.data_config, [arr])[0]
    assert res["top_k_predictions"][0]["class_id"] == int(probs.argmax())
    assert res["confidence"] == pytest.approx(float(probs.max()), abs=1e-5)
    assert res["predicted_class"] == pred.class_names[int(probs.argmax())]


def test_legacy_pt(trained, tmp_path):
    state = ckpt.load_model_state(trained["checkpoint"])
    legacy = tmp_path / "best.pt"
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 5}, legacy)
    with pytest.raises(ConfigError, match="model_name and num_classes"):
        Predictor.from_checkpoint(str(legacy))
    with pytest.raises(CheckpointError, match="best.pt"):
        Predictor.from_checkpoint(str(legacy), model_name=MODEL, num_classes=5)
    pred = Predictor.from_checkpoint(str(legacy), model_name=MODEL, num_classes=3)
    assert pred.kind == "legacy_pt" and pred.class_names == ["0", "1", "2"]
    arr = color_image("blue", seed=11)
    model = timm.create_model(MODEL, num_classes=3)
    model.load_state_dict(state)
    probs = _direct_probs(model.eval(), pred.data_config, [arr])[0]
    (res,) = pred.predict([arr], top_k=1)
    assert res["top_k_predictions"][0]["class_id"] == int(probs.argmax())
    assert res["confidence"] == pytest.approx(float(probs.max()), abs=1e-5)


def test_evaluate_checkpoint_matches_direct_computation(trained, tmp_path):
    data = write_imagefolder(tmp_path / "data")
    csv_path = tmp_path / "out" / "predictions.csv"
    result = evaluate_checkpoint(trained["run"], data, predictions_csv=str(csv_path), batch_size=4)

    pred = Predictor.from_checkpoint(trained["checkpoint"])
    files = sorted((tmp_path / "data" / "val").glob("*/*.png"))
    arrays = [decode_image(f) for f in files]
    labels = torch.tensor([CLASSES.index(f.parent.name) for f in files])
    logits = pred.logits(torch.stack([pred.preprocess(a) for a in arrays]))
    top1 = (logits.argmax(1) == labels).float().mean().item() * 100
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert result["num_samples"] == len(files) == 9
    assert result["top1"] == pytest.approx(top1) and result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["top5"] == 100.0  # 3 classes: top-5 clamps to top-3
    assert np.array(result["confusion_matrix"]).sum() == 9
    assert set(result["per_class"]) == set(CLASSES)

    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == 9
    by_file = {r["file"]: r for r in rows}
    probs = torch.softmax(logits, 1)
    for f, p in zip(files, probs):
        row = by_file[f"val/{f.parent.name}/{f.name}"]
        assert row["label"] == f.parent.name
        assert row["predicted"] == CLASSES[int(p.argmax())]
        assert float(row["confidence"]) == pytest.approx(float(p.max()), abs=1e-6)


def test_evaluate_rejects_different_classes(trained, tmp_path):
    data = write_imagefolder(tmp_path / "data", per_class_val=1)
    os.rename(tmp_path / "data" / "train" / "red", tmp_path / "data" / "train" / "crimson")
    os.rename(tmp_path / "data" / "val" / "red", tmp_path / "data" / "val" / "crimson")
    with pytest.raises(DataError, match="crimson") as e:
        evaluate_checkpoint(trained["checkpoint"], data)
    assert "red" in str(e.value)


@pytest.mark.s3
def test_predictor_and_evaluate_from_bucket(trained, s3_env, tmp_path):
    from raytimm import storage
    run = s3_env.uri("runs/colors")
    remote = f"{run}/checkpoint_000001"
    ckpt.save_checkpoint(remote, model_state=ckpt.load_model_state(trained["checkpoint"]),
                         meta=ckpt.load_meta(trained["checkpoint"]))
    ckpt.write_best_pointer(run, remote, {})
    local = Predictor.from_checkpoint(trained["checkpoint"])
    pred = Predictor.from_checkpoint(run)
    assert pred.source == remote
    arrays = [color_image(c, seed=30 + i) for i, c in enumerate(CLASSES)]
    assert pred.predict(arrays) == local.predict(arrays)

    data = write_imagefolder(tmp_path / "data", per_class_val=2)
    storage.upload(data, s3_env.uri("data/colors"))
    got = evaluate_checkpoint(run, s3_env.uri("data/colors"), cache_dir=str(tmp_path / "cache"))
    want = evaluate_checkpoint(trained["checkpoint"], data)
    assert got["top1"] == want["top1"] and got["num_samples"] == want["num_samples"] == 6
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    # Staged where training stages (data.loaders.stage_dataset): <cache>/datasets, so a node stages a dataset once.
    assert any((tmp_path / "cache" / "datasets").iterdir())


def test_evaluate_skips_unreadable_files(trained, tmp_path):
    data = write_imagefolder(tmp_path / "data", per_class_val=2)
    (tmp_path / "data" / "val" / "red" / "broken.png").write_bytes(b"not a png")
    result = evaluate_checkpoint(trained["checkpoint"], data)
    assert result["num_samples"] == 6
    assert [s["file"] for s in result["skipped"]] == ["val/red/broken.png"]

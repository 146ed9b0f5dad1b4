"""ONNX export (raytimm export) with its parity check, and the ONNX Runtime backend of Predictor/evaluate.

Real exports through torch.onnx.export and real ONNX Runtime sessions on CPU; checkpoints are made
in the test (pretrained=False weights saved with checkpoint.save_checkpoint, or a briefly trained one).
"""
import csv
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from raytimm import checkpoint as ckpt
from raytimm import export
from raytimm.cli import main
from raytimm.data.transforms import resolve_data_config
from raytimm.errors import CheckpointError, ConfigError, ExportError
from raytimm.predict import Predictor
from tests.test_predict import CLASSES, MODEL, color_image, make_trained_checkpoint, write_imagefolder
from tests.test_target_models import one_thread  # noqa: F401 - autouse: one torch thread on shared cores

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore")  # the exporter's own deprecation chatter


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    return {"run": str(run), "checkpoint": make_trained_checkpoint(run)}


def _save_untrained(path, name: str, num_classes: int = 3, img_size: int = 224) -> str:
    """A pretrained=False timm model saved as a checkpoint, with the data config training would store."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    ckpt.save_checkpoint(str(path), model_state=model.state_dict(), meta={
        "model_name": name, "num_classes": num_classes, "class_names": [f"c{i}" for i in range(num_classes)],
        "data_config": resolve_data_config(model, img_size=img_size), "epoch": 1, "metrics": {}})
    return str(path)


# ----------------------------------------------------------------------------- parity figures

def test_compare_logits_figures_and_tolerance():
    ref = np.array([[10.0, -2.0, 0.5], [1.0, 3.0, -4.0]])
    ok = export.compare_logits(ref, ref + 5e-3, "random")
    assert ok.max_abs_diff == pytest.approx(5e-3) and ok.logit_scale == 10.0
    assert ok.tolerance == pytest.approx(export.RTOL * 10.0 + export.ATOL) and ok.passed
    assert ok.top1_agree == 2 and ok.to_dict()["passed"] is True
    bad = export.compare_logits(ref, ref + np.array([[0, 0, 0], [0, -2.5, 0]]), "images")
    assert not bad.passed and bad.top1_agree == 1
    assert "max |Δ logit| 2.5" in bad.describe() and "top-1 agreement 1/2" in bad.describe()
    nan = ref.copy()
    nan[0, 0] = np.nan
    assert not export.compare_logits(ref, nan, "random").passed
    with pytest.raises(ExportError, match="shape"):
        export.compare_logits(ref, ref[:1], "random")


# ----------------------------------------------------------------------------- the target models

TARGETS = [pytest.param("resnet18"), pytest.param("efficientnet_b0"), pytest.param("mobilenetv3_small_100"),
           pytest.param("vit_small_patch16_224", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", TARGETS)
def test_target_model_exports_with_dynamic_batch(name, tmp_path):
    source = _save_untrained(tmp_path / "checkpoint_000001", name)
    result = export.export_checkpoint(source)
    out = Path(source) / "onnx"
    assert result.output == str(out) and sorted(os.listdir(out)) == ["meta.json", "model.onnx"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "onnx" and meta["opset"] == export.DEFAULT_OPSET
    assert meta["source_checkpoint"] == source and meta["model_name"] == name
    assert meta["class_names"] == ["c0", "c1", "c2"] and meta["data_config"]["input_size"] == [3, 224, 224]
    (parity,) = meta["parity"]
    assert parity["probe"] == "random" and parity["passed"] and parity["max_abs_diff"] <= parity["tolerance"]
    assert parity["top1_agree"] == parity["count"] == export.PROBE_BATCH
    assert meta["versions"]["onnxruntime"] and meta["onnx_bytes"] == (out / "model.onnx").stat().st_size

    # Independently of the export's own check: other batch sizes through ONNX Runtime match eager PyTorch.
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)  # a named, dynamic batch axis
    model = timm.create_model(name, num_classes=3)
    model.load_state_dict(ckpt.load_model_state(source))
    for batch in (1, 3):
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
        with torch.inference_mode():
            ref = model.eval()(x).numpy()
        got = session.run(None, {"input": x.numpy()})[0]
        assert got.shape == (batch, 3)
        assert np.abs(got - ref).max() <= export.RTOL * np.abs(ref).max() + export.ATOL


def test_img_size_resizes_a_vit(tmp_path):
    source = _save_untrained(tmp_path / "ckpt", "test_vit", img_size=32)
    result = export.export_checkpoint(source, output=str(tmp_path / "out"), img_size=48)
    meta = ckpt.load_meta(tmp_path / "out")
    assert result.input_size == [3, 48, 48] and meta["data_config"]["input_size"] == [3, 48, 48]
    assert meta["parity"][0]["passed"]
    pred = Predictor.from_checkpoint(str(tmp_path / "out"), backend="onnx")
    assert pred.predict([color_image("red", size=(60, 50))])[0]["predicted_class"] in ["c0", "c1", "c2"]


# ----------------------------------------------------------------------------- the command

def test_cli_export_run_folder_with_check_images(trained, tmp_path, capsys):
    images = write_imagefolder(tmp_path / "images")
    result_json = tmp_path / "export.json"
    assert main(["export", "--checkpoint", trained["run"], "--format", "onnx", "--check-images", images,
                 "--result-json", str(result_json)]) == 0
    out = Path(trained["checkpoint"]) / "onnx"
    printed = capsys.readouterr().out
    assert f"-> {out}" in printed and "random (4): max |Δ logit|" in printed and "images (15)" in printed
    summary = json.loads(result_json.read_text())
    assert summary["output"] == str(out) and [p["probe"] for p in summary["parity"]] == ["random", "images"]
    images_check = summary["parity"][1]
    assert images_check["count"] == 15 and images_check["top1_agree"] == 15  # 2 train + 3 val x 3 classes
    # The trained model's real-image logits are large (confident); the figure is far inside the tolerance.
    assert images_check["logit_scale"] > 1.0 and images_check["passed"]
    meta = ckpt.load_meta(out)
    assert meta["class_names"] == CLASSES and meta["metrics"] == {"val/top1": 100.0}
    assert meta["parity"] == summary["parity"]
    assert ckpt.resolve_checkpoint(str(out)).kind == "onnx"
    assert ckpt.resolve_checkpoint(str(out / "model.onnx")).uri == str(out)

    # Exporting again replaces the earlier export in place.
    assert main(["export", "--checkpoint", trained["checkpoint"]]) == 0
    assert ckpt.load_meta(out)["parity"][0]["probe"] == "random" and len(ckpt.load_meta(out)["parity"]) == 1


def test_cli_refuses_to_overwrite_a_checkpoint(trained, capsys):
    before = Path(trained["checkpoint"], "meta.json").read_bytes()
    assert main(["export", "--checkpoint", trained["checkpoint"], "--output", trained["checkpoint"]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds a checkpoint" in err and trained["checkpoint"] in err
    assert Path(trained["checkpoint"], "meta.json").read_bytes() == before


def test_cli_legacy_pt(trained, tmp_path, capsys):
    legacy = tmp_path / "best.pt"
    torch.save({"model_state_dict": ckpt.load_model_state(trained["checkpoint"])}, legacy)
    assert main(["export", "--checkpoint", str(legacy)]) == 2
    assert "model_name and num_classes" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(legacy), "--model-name", MODEL, "--num-classes", "3"]) == 0
    meta = ckpt.load_meta(tmp_path / "best_onnx")
    assert meta["source_kind"] == "legacy_pt" and meta["class_names"] == ["0", "1", "2"]
    assert meta["source_checkpoint"] == str(legacy)


def test_parity_failure_names_the_checkpoint_and_writes_nothing(trained, tmp_path, monkeypatch):
    real_export_model = export.export_model

    def export_a_different_model(model, path, **kwargs):
        # A broken exporter, simulated by exporting weights that are not the checkpoint's.
        import copy
        other = copy.deepcopy(model)
        with torch.no_grad():
            other.get_classifier().bias.add_(1.0)
        real_export_model(other, path, **kwargs)

    monkeypatch.setattr(export, "export_model", export_a_different_model)
    out = tmp_path / "out"
    with pytest.raises(ExportError) as info:
        export.export_checkpoint(trained["checkpoint"], output=str(out))
    message = str(info.value)
    assert "\n" not in message and trained["checkpoint"] in message and "does not match PyTorch" in message
    assert "max |Δ logit| 1 (tolerance" in message and "top-1 agreement" in message
    assert not out.exists()


def test_opset_below_the_exporter_minimum_is_refused(trained, tmp_path):
    with pytest.raises(ConfigError, match="--opset 11"):
        export.export_checkpoint(trained["checkpoint"], output=str(tmp_path / "o"), opset=11)


# ----------------------------------------------------------------------------- the backend

def test_onnx_backend_answers_like_torch_and_caches_by_content(trained, tmp_path):
    cache = tmp_path / "cache"
    torch_pred = Predictor.from_checkpoint(trained["run"])
    onnx_pred = Predictor.from_checkpoint(trained["run"], backend="onnx", cache_dir=str(cache), num_threads=1)
    assert onnx_pred.backend == "onnx" and onnx_pred.model is None and onnx_pred.source == trained["checkpoint"]
    assert onnx_pred.class_names == CLASSES and onnx_pred.data_config == torch_pred.data_config
    arrays = [color_image(c, seed=40 + i) for i, c in enumerate(["red", "green", "blue", "blue"])]
    a, b = torch_pred.predict(arrays, top_k=3), onnx_pred.predict(arrays, top_k=3)
    assert [r["predicted_class"] for r in b] == ["red", "green", "blue", "blue"]
    for x, y in zip(a, b):
        assert set(x) == set(y) and x["task_type"] == y["task_type"]
        assert [p["class_id"] for p in x["top_k_predictions"]] == [p["class_id"] for p in y["top_k_predictions"]]
        assert [p["confidence"] for p in y["top_k_predictions"]] == pytest.approx(
            [p["confidence"] for p in x["top_k_predictions"]], abs=1e-5)
    md = onnx_pred.metadata()
    assert md["backend"] == "onnx" and md["providers"] == ["CPUExecutionProvider"] and md["threads"] == 1
    assert onnx_pred.runner.session.get_session_options().intra_op_num_threads == 1
    assert torch_pred.metadata()["backend"] == "torch"

    (entry,) = [p for p in (cache / "onnx").iterdir() if p.is_dir()]
    stamp = (entry / "model.onnx").stat().st_mtime_ns
    # A raytimm.cache entry: `raytimm cache ls` shows it, and it is not held once ONNX Runtime has read it.
    from raytimm import cache as node_cache
    (listed,) = node_cache.list_entries(str(cache))
    assert (listed.kind, listed.path, listed.source) == ("onnx", str(entry), trained["checkpoint"])
    assert not listed.in_use and listed.size >= (entry / "model.onnx").stat().st_size
    Predictor.from_checkpoint(trained["checkpoint"], backend="onnx", cache_dir=str(cache))
    assert [p for p in (cache / "onnx").iterdir() if p.is_dir()] == [entry]
    assert (entry / "model.onnx").stat().st_mtime_ns == stamp  # reused, not exported again
    # New content (here a changed meta.json) is a new cache entry.
    meta = ckpt.load_meta(trained["checkpoint"])
    changed = tmp_path / "changed"
    ckpt.save_checkpoint(changed, model_state=ckpt.load_model_state(trained["checkpoint"]), meta={**meta, "epoch": 2})
    Predictor.from_checkpoint(str(changed), backend="onnx", cache_dir=str(cache))
    assert len([p for p in (cache / "onnx").iterdir() if p.is_dir()]) == 2


def test_two_loaders_export_once(trained, tmp_path, monkeypatch):
    calls = []
    real = export.export_predictor

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(export, "export_predictor", counting)
    resolved = ckpt.resolve_checkpoint(trained["checkpoint"])
    results = []
    threads = [threading.Thread(target=lambda: results.append(export.cached_export(resolved, cache_dir=str(tmp_path))))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1] and len(calls) == 1
    assert not [p for p in (tmp_path / "onnx").iterdir() if p.name.startswith(".")]  # no leftover temp folder


def test_export_folders_load_only_with_the_onnx_backend(trained, tmp_path):
    out = tmp_path / "exp"
    export.export_checkpoint(trained["checkpoint"], output=str(out))
    pred = Predictor.from_checkpoint(str(out), backend="onnx")
    assert pred.kind == "onnx" and pred.source == str(out) and pred.metadata()["backend"] == "onnx"
    assert pred.predict([color_image("green", seed=5)])[0]["predicted_class"] == "green"
    with pytest.raises(CheckpointError, match="is an ONNX export: load it with backend onnx"):
        Predictor.from_checkpoint(str(out))
    with pytest.raises(CheckpointError, match="ONNX export"):
        from raytimm.model import load_init_checkpoint
        load_init_checkpoint(timm.create_model(MODEL, num_classes=3), str(out))
    with pytest.raises(ConfigError, match="backend='tensorflow'"):
        Predictor.from_checkpoint(str(out), backend="tensorflow")
    # A graph whose input size disagrees with meta.json is refused at load, not at the first request.
    meta = ckpt.load_meta(out)
    meta["data_config"]["input_size"] = [3, 64, 64]
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"input_size is \[3, 64, 64\]"):
        Predictor.from_checkpoint(str(out), backend="onnx")
    meta = ckpt.load_meta(tmp_path / "exp")
    meta["data_config"]["input_size"] = [3, 32, 32]
    meta.update(num_classes=4, class_names=CLASSES + ["pink"])
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="3 logits but meta.json num_classes is 4"):
        Predictor.from_checkpoint(str(out), backend="onnx")


@pytest.mark.s3
def test_export_to_and_serve_from_a_bucket(trained, s3_env):
    uri = s3_env.uri("exports/colors")
    result = export.export_checkpoint(trained["checkpoint"], output=uri)
    assert result.output == uri
    keys = {o["Key"] for o in s3_env.client().list_objects_v2(Bucket=s3_env.bucket)["Contents"]}
    assert keys == {"exports/colors/model.onnx", "exports/colors/meta.json"}
    pred = Predictor.from_checkpoint(uri, backend="onnx")
    assert pred.kind == "onnx" and pred.predict([color_image("blue", seed=9)])[0]["predicted_class"] == "blue"


_WITHOUT_ONNX = """
import contextlib, io, json, sys
for name in ("onnx", "onnxruntime", "onnxscript"):
    sys.modules[name] = None  # what `import` sees when the extra is not installed
import raytimm.export, raytimm.predict
from raytimm.cli import main
out = {}
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    out[argv[0]] = [code, err.getvalue()]
print(json.dumps(out))
"""


def test_without_the_onnx_extra_modules_import_and_one_line_names_it(trained, tmp_path):
    commands = [["evaluate", "--backend", "onnx", "--data", str(tmp_path), "--checkpoint", trained["checkpoint"]],
                ["export", "--checkpoint", trained["checkpoint"]]]
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_ONNX, json.dumps(commands)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["evaluate"] == [2, "error: the onnx backend needs onnxruntime, which is not installed: "
                                      "pip install raytimm[onnx]\n"]
    assert results["export"] == [2, "error: ONNX export needs onnx, which is not installed: "
                                    "pip install raytimm[onnx]\n"]


# ----------------------------------------------------------------------------- evaluate

def test_evaluate_onnx_matches_torch_per_file(tmp_path, monkeypatch):
    from raytimm.config import config_from_dict
    from raytimm.data.demo import make_demo_dataset
    from raytimm.engine import fit

    data = make_demo_dataset(tmp_path / "data", classes=3, per_class=12, size=32)
    cfg = config_from_dict({
        "data": {"path": data, "num_workers": 0, "rrc": False, "hflip": 0.0, "color_jitter": 0.0},
        "model": {"name": MODEL, "img_size": 32},
        "train": {"epochs": 2, "batch_size": 8, "lr": 0.01, "warmup_epochs": 0, "seed": 0, "threads": 1},
        "storage": {"path": str(tmp_path / "runs")}, "run": {"name": "run"}, "mlflow": {"enabled": False}})
    fit(cfg)
    run = str(tmp_path / "runs" / "run")
    out = {}
    for backend in ("torch", "onnx"):
        csv_path, result = tmp_path / f"{backend}.csv", tmp_path / f"{backend}.json"
        argv = ["evaluate", "--checkpoint", run, "--data", data, "--predictions", str(csv_path),
                "--result-json", str(result), "--backend", backend]
        monkeypatch.setenv("RAYTIMM_CACHE_DIR", str(tmp_path / "cache"))
        assert main(argv) == 0
        out[backend] = (list(csv.DictReader(open(csv_path))), json.loads(result.read_text()))
    (t_rows, t_res), (o_rows, o_res) = out["torch"], out["onnx"]
    assert len(t_rows) == t_res["num_samples"] == o_res["num_samples"] > 0
    assert [(r["file"], r["label"], r["predicted"]) for r in t_rows] == \
           [(r["file"], r["label"], r["predicted"]) for r in o_rows]
    assert [float(r["confidence"]) for r in o_rows] == pytest.approx([float(r["confidence"]) for r in t_rows],
                                                                      abs=1e-5)
    assert o_res["top1"] == t_res["top1"] and o_res["top5"] == t_res["top5"]
    assert o_res["per_class"] == t_res["per_class"]
    assert o_res["loss"] == pytest.approx(t_res["loss"], rel=1e-5, abs=1e-6)
    assert (tmp_path / "cache" / "onnx").is_dir()

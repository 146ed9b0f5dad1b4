"""Config: shipped YAMLs parse, overrides apply, every error names the key; platform requests map."""
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raytimm.config import (
    Config, apply_overrides, config_from_dict, config_to_dict, field_docs, flatten_config, load_config,
    load_training_request, request_to_config, set_dotted, valid_keys,
)
from raytimm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(glob.glob(str(ROOT / "configs" / "**" / "*.yaml"), recursive=True))
TARGET_MODELS = ["resnet18", "resnet34", "resnet50", "resnet101", "efficientnet_b0", "efficientnet_b1",
                 "efficientnet_b2", "vit_small_patch16_224", "vit_base_patch16_224", "mobilenetv3_large_100",
                 "mobilenetv3_small_100"]


@pytest.mark.parametrize("path", [p for p in SHIPPED if not p.endswith("serve.yaml")], ids=os.path.basename)
def test_every_shipped_yaml_parses(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_every_target_model_has_a_config():
    for name in TARGET_MODELS:
        cfg = load_config(ROOT / "configs" / "train" / f"{name}.yaml")
        assert cfg.model.name == name


def test_every_field_has_a_doc():
    docs = field_docs()
    assert set(docs) == set(valid_keys())
    missing = [k for k, d in docs.items() if not d.strip()]
    assert missing == []


def test_overrides_apply_with_yaml_types():
    cfg = load_config(None, ["train.epochs=3", "scaling.num_workers=2", "data.rrc_scale=[0.5, 1.0]",
                             "model.img_size=null", "train.lr=1e-3", "scaling.use_gpu=false"])
    assert cfg.train.epochs == 3 and cfg.scaling.num_workers == 2
    assert cfg.data.rrc_scale == [0.5, 1.0]
    assert cfg.model.img_size is None
    assert cfg.train.lr == pytest.approx(1e-3)  # "1e-3" is a string to YAML 1.1; floats accept it
    assert cfg.scaling.use_gpu is False


def test_overrides_win_over_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 7\n  lr: 0.01\n")
    cfg = load_config(p, ["train.epochs=2"])
    assert cfg.train.epochs == 2 and cfg.train.lr == 0.01


@pytest.mark.parametrize("override,needle", [
    ("train.lrr=1", "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
    ("trian.lr=1", "unknown section 'trian' (did you mean 'train'?)"),
    ("train.epochs=abc", "train.epochs='abc' has the wrong type: expected an integer"),
    ("train.lr=fast", "train.lr='fast' has the wrong type: expected a number"),
    ("train.ema=maybe", "train.ema='maybe' has the wrong type: expected a boolean"),
    ("train.lr=0", "train.lr=0.0 is out of range: expected > 0"),
    ("train.lr=-1", "train.lr=-1.0 is out of range"),
    ("train.epochs=0", "train.epochs=0 is out of range: expected >= 1"),
    ("data.split_ratio=1.0", "data.split_ratio=1.0 is out of range: expected a number in (0, 1)"),
    ("data.split_ratio=0", "data.split_ratio"),
    ("train.amp=bf61", "train.amp='bf61' is not allowed"),
    ("train.channels_last=maybe", "train.channels_last='maybe' is not allowed"),
    ("checkpoint.metric=val/acc", "checkpoint.metric='val/acc' is out of range"),
    ("data.format=coco", "data.format='coco' is not allowed"),
    ("run.name=../x", "run.name='../x'"),
    ("epochs=3", "unknown key 'epochs'"),
    ("train.epochs", "must look like key=value"),
])
def test_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError) as ei:
        load_config(None, [override])
    msg = str(ei.value)
    assert needle in msg
    assert "\n" not in msg


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  nmae: resnet18\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'model.nmae' \(did you mean 'model.name'\?\)"):
        load_config(p)


def test_invalid_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("train:\n  epochs: [1,\n")
    with pytest.raises(ConfigError, match=r"broken.yaml.*invalid YAML"):
        load_config(p)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/x.yaml")


def test_round_trip_dict_and_flatten():
    cfg = load_config(None, ["train.epochs=4", "tune.search_space={train.lr: {loguniform: [0.0001, 0.01]}}"])
    again = config_from_dict(config_to_dict(cfg))
    assert again == cfg
    flat = flatten_config(cfg)
    assert flat["train.epochs"] == 4 and "tune.search_space" in flat
    assert set(flat) == set(valid_keys())


def test_set_dotted_validates():
    cfg = set_dotted(Config(), "train.batch_size", 8)
    assert cfg.train.batch_size == 8
    with pytest.raises(ConfigError, match="train.batch_size"):
        set_dotted(Config(), "train.batch_size", 0)
    with pytest.raises(ConfigError, match="did you mean 'train.batch_size'"):
        set_dotted(Config(), "train.batchsize", 8)


def test_mutable_defaults_are_not_shared():
    a, b = Config(), Config()
    a.serve.allow.append("s3://x")
    assert b.serve.allow == []


REQUEST = {
    "training_job_id": 100, "project_id": 7, "framework": "timm", "model_name": "resnet50", "num_classes": 3,
    "dataset_path": "/data/projects/7/dice", "dataset_format": "dice", "epochs": 12, "batch_size": 16,
    "learning_rate": 0.0005, "checkpoint_path": "r2://bucket/checkpoints/projects/7/jobs/99/best.pt", "img_size": 160,
}


def test_training_request_maps_to_config(tmp_path):
    p = tmp_path / "req.json"
    p.write_text(json.dumps(REQUEST))
    cfg = load_training_request(p)
    assert cfg.run.name == "job_100"
    assert cfg.mlflow.experiment == "project_7"
    assert cfg.model.name == "resnet50" and cfg.model.num_classes == 3 and cfg.model.img_size == 160
    assert cfg.model.init_checkpoint == REQUEST["checkpoint_path"]
    assert cfg.data.path == "/data/projects/7/dice" and cfg.data.format == "dice"
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr) == (12, 16, 0.0005)


def test_training_request_optional_fields_and_overrides(tmp_path):
    req = {k: v for k, v in REQUEST.items() if k not in ("checkpoint_path", "img_size")}
    req["dataset_format"] = "imagefolder"
    p = tmp_path / "req.json"
    p.write_text(json.dumps(req))
    cfg = load_training_request(p, ["scaling.num_workers=2"])
    assert cfg.model.init_checkpoint is None and cfg.model.img_size is None
    assert cfg.scaling.num_workers == 2


@pytest.mark.parametrize("change,needle", [
    ({"framework": "ultralytics"}, "framework='ultralytics' is not supported"),
    ({"dataset_format": "coco"}, "dataset_format='coco' is not allowed"),
    ({"learning_rate": -1}, "learning_rate=-1.0 is out of range"),
    ({"epochs": "ten"}, "epochs='ten' has the wrong type"),
    ({"model_name": None}, "missing required field 'model_name'"),
    ({"modelname": "x"}, "unknown field 'modelname' (did you mean 'model_name'?)"),
])
def test_training_request_errors(change, needle):
    req = {**REQUEST, **change}
    req = {k: v for k, v in req.items() if v is not None}
    with pytest.raises(ConfigError) as ei:
        request_to_config(req, source="req.json")
    assert needle in str(ei.value)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "raytimm.cli", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=120)


def test_cli_help_explains_every_command():
    r = _cli("--help")
    assert r.returncode == 0
    for cmd in ("demo-data", "convert", "train", "tune", "evaluate", "serve", "config-keys"):
        assert cmd in r.stdout
    r = _cli("train", "--help")
    assert r.returncode == 0 and "key=value" in r.stdout and "--result-json" in r.stdout


def test_cli_config_error_is_one_line_exit_2():
    r = _cli("train", "--config", "configs/quickstart.yaml", "train.lrr=0.1")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: override: unknown key 'train.lrr' (did you mean 'train.lr'?)"
    assert "Traceback" not in r.stderr


def test_cli_config_keys_lists_all_keys():
    r = _cli("config-keys")
    assert r.returncode == 0
    for key in ("train.lr", "scaling.num_workers", "storage.path", "tune.search_space", "serve.allow"):
        assert key in r.stdout


def test_yaml_booleans_map_back_to_string_choices():
    # YAML 1.1 reads `off` and `true` as booleans; the string choices still apply.
    cfg = load_config(None, ["train.amp=off", "train.channels_last=true"])
    assert cfg.train.amp == "off" and cfg.train.channels_last == "true"
    cfg = load_config(None, ["train.channels_last=false"])
    assert cfg.train.channels_last == "false"


# ------------------------------------------------------------------ multi-label and imbalance keys

ML = ["data.format=manifest", "data.multi_label=true"]


def test_multi_label_defaults_rank_by_map_and_keys_validate():
    cfg = apply_overrides(Config(), ML + ["train.pos_weight=auto", "train.calibrate_thresholds=true"])
    assert cfg.checkpoint.metric == "val/mAP" and cfg.tune.metric == "val/mAP" and cfg.checkpoint.mode == "max"
    assert cfg.train.pos_weight == "auto" and cfg.train.calibrate_thresholds
    again = config_from_dict(config_to_dict(cfg))  # the round trip keeps it
    assert again.checkpoint.metric == "val/mAP"
    assert apply_overrides(Config(), ML + ["checkpoint.metric=val/f1_macro"]).checkpoint.metric == "val/f1_macro"
    assert apply_overrides(Config(), ["data.format=dice", "data.multi_label=true"]).data.multi_label
    single = apply_overrides(Config(), ["data.balance=sampler", "checkpoint.metric=val/balanced_acc"])
    assert single.data.balance == "sampler" and single.checkpoint.metric == "val/balanced_acc"
    assert apply_overrides(Config(), ["data.balance=none"]).data.balance == "none"  # YAML keeps `none` a string


@pytest.mark.parametrize("overrides,needle", [
    (["data.multi_label=true"], "data.multi_label=true needs data.format=manifest or dice"),
    (ML + ["data.balance=sampler"], "data.balance='sampler' is for single-label data"),
    (ML + ["checkpoint.metric=val/top5"], "checkpoint.metric='val/top5' is a single-label metric"),
    (ML + ["tune.metric=val/balanced_acc"], "tune.metric='val/balanced_acc' is a single-label metric"),
    (["checkpoint.metric=val/mAP"], "checkpoint.metric='val/mAP' is a multi-label metric"),
    (["tune.metric=val/f1_micro"], "tune.metric='val/f1_micro' is a multi-label metric"),
    (["train.pos_weight=auto"], "train.pos_weight='auto' needs data.multi_label=true"),
    (["train.calibrate_thresholds=true"], "train.calibrate_thresholds=true needs data.multi_label=true"),
    (["data.balance=loss", "train.mixup=0.2"], "data.balance='loss' cannot be combined with train.mixup"),
    (["data.balance=both"], "data.balance='both' is not allowed"),
    (["train.pos_weight=7"], "train.pos_weight=7 is not allowed"),
    (["data.format=csv"], "data.format='csv' is not allowed"),
    (["checkpoint.metric=val/map"], "checkpoint.metric='val/map' is out of range"),
])
def test_task_key_errors_name_the_keys(overrides, needle):
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), overrides)
    assert needle in str(e.value)


def test_config_keys_lists_the_new_keys():
    r = _cli("config-keys")
    for key in ("data.multi_label", "data.balance", "train.pos_weight", "train.calibrate_thresholds"):
        assert key in r.stdout
    assert "manifest" in field_docs()["data.format"]

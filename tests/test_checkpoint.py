"""Checkpoint folder format, pointers, resolution and the no-unpickling rule."""
import json
import os
import pickle

import pytest
import timm
import torch

from raytimm import checkpoint as ckpt
from raytimm.errors import CheckpointError, CheckpointNotFound


def _model_state(num_classes=3):
    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False, num_classes=num_classes).state_dict()


def _meta(**extra):
    meta = {"model_name": "test_resnet", "num_classes": 3, "class_names": ["a", "b", "c"],
            "data_config": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3,
                            "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"},
            "epoch": 2, "metrics": {"val/top1": 50.0}}
    meta.update(extra)
    return meta


def _save(path, **kw):
    ckpt.save_checkpoint(path, model_state=_model_state(), meta=_meta(), **kw)
    return str(path)


class _Payload:
    """Pickles to a call that would create a file if anything ever unpickled it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_round_trip_and_meta_fields(tmp_path):
    state = _model_state()
    meta = _meta(config={"storage": {"path": "s3://b/runs", "secret_access_key": "SECRET1"},
                         "mlflow": {"tracking_uri": "https://user:SECRET2@mlflow.example/", "api_token": "SECRET3"},
                         "train": {"lr": 0.1}})
    ckpt.save_checkpoint(tmp_path / "c", model_state=state, meta=meta, train_state={"epoch": 2, "opt": {"lr": 0.1}})
    assert sorted(os.listdir(tmp_path / "c")) == ["meta.json", "model.safetensors", "train_state.pt"]

    loaded = ckpt.load_model_state(tmp_path / "c")
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)

    got = ckpt.load_meta(tmp_path / "c")
    assert got["model_name"] == "test_resnet" and got["class_names"] == ["a", "b", "c"]
    assert got["format_version"] == ckpt.FORMAT_VERSION
    assert set(got["versions"]) == {"raytimm", "timm", "torch"}
    assert got["config"]["train"]["lr"] == 0.1 and got["config"]["storage"]["path"] == "s3://b/runs"
    raw = (tmp_path / "c" / "meta.json").read_text()
    assert "SECRET" not in raw and "user:" not in raw

    assert ckpt.load_train_state(tmp_path / "c") == {"epoch": 2, "opt": {"lr": 0.1}}
    assert ckpt.is_complete(tmp_path / "c")


def test_meta_config_secrets_scrubbed_in_lists_and_any_case(tmp_path):
    config = {"hooks": [{"url": "https://u:SECRET1@hook.example/", "api_token": "SECRET2"}],
              "headers": {"Authorization": "Bearer SECRET3"}, "storage": {"accessKey": "SECRET4"}}
    ckpt.save_checkpoint(tmp_path / "c", model_state=_model_state(), meta=_meta(config=config))
    raw = (tmp_path / "c" / "meta.json").read_text()
    assert "SECRET" not in raw
    assert ckpt.load_meta(tmp_path / "c")["config"]["hooks"] == [{"url": "https://***@hook.example/"}]


def test_shared_tensors_are_saved(tmp_path):
    w = torch.randn(4, 3)
    ckpt.save_checkpoint(tmp_path / "c", model_state={"a": w, "b": w, "c": w[1:3]}, meta=_meta())
    got = ckpt.load_model_state(tmp_path / "c")
    assert torch.equal(got["a"], w) and torch.equal(got["b"], w) and torch.equal(got["c"], w[1:3])


def test_train_state_with_numpy_rng_round_trips(tmp_path):
    import numpy as np
    rng, torch_rng = np.random.get_state(), torch.get_rng_state()
    _save(tmp_path / "c", train_state={"numpy_rng": rng, "torch_rng": torch_rng.clone()})
    got = ckpt.load_train_state(tmp_path / "c")
    assert (got["numpy_rng"][1] == rng[1]).all()
    assert torch.equal(got["torch_rng"], torch_rng)


def test_pointer_only_for_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint_000").mkdir(parents=True)
    (run / "checkpoint_000" / "model.safetensors").write_bytes(b"partial")
    with pytest.raises(CheckpointError, match="incomplete"):
        ckpt.write_best_pointer(run, run / "checkpoint_000", {"val/top1": 1.0})
    assert not (run / "best").exists()

    _save(run / "checkpoint_001")
    ckpt.write_best_pointer(run, run / "checkpoint_001", {"val/top1": 75.0})
    ckpt.write_latest_pointer(run, run / "checkpoint_001", {"val/top1": 75.0})
    info = json.loads((run / "best").read_text())
    assert info["checkpoint"] == "checkpoint_001"  # relative, so the run folder can move
    assert info["metrics"] == {"val/top1": 75.0} and info["updated"]
    assert ckpt.read_pointer(run) == str(run / "checkpoint_001")
    assert ckpt.read_pointer(run, "latest") == str(run / "checkpoint_001")
    assert ckpt.read_pointer(tmp_path) is None


def test_resolve_all_kinds(tmp_path):
    run = tmp_path / "run"
    c = _save(run / "checkpoint_001")
    ckpt.write_best_pointer(run, c, {})
    assert ckpt.resolve_checkpoint(c) == ckpt.ResolvedCheckpoint("folder", c)
    assert ckpt.resolve_checkpoint(f"file://{c}").uri == c
    assert ckpt.resolve_checkpoint(str(run)) == ckpt.ResolvedCheckpoint("folder", c)
    assert ckpt.resolve_checkpoint(os.path.join(c, "meta.json")).uri == c

    # A tune folder whose best pointer names a trial's run folder (two levels).
    tune = tmp_path / "tune"
    tune.mkdir()
    ckpt.write_best_pointer(tune, c, {})
    (tune / "best").write_text(json.dumps({"checkpoint": str(run)}))
    assert ckpt.resolve_checkpoint(tune).uri == c

    legacy = tmp_path / "best.pt"
    torch.save({"model_state_dict": _model_state()}, legacy)
    assert ckpt.resolve_checkpoint(legacy) == ckpt.ResolvedCheckpoint("legacy_pt", str(legacy))


def test_resolve_errors_name_the_uri(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointNotFound, match="nope"):
        ckpt.resolve_checkpoint(missing)
    with pytest.raises(CheckpointNotFound, match="gone.pt"):
        ckpt.resolve_checkpoint(tmp_path / "gone.pt")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "readme.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="junk") as e:
        ckpt.resolve_checkpoint(junk)
    assert not isinstance(e.value, CheckpointNotFound)
    (junk / "meta.json").write_text("{}")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        ckpt.resolve_checkpoint(junk)
    with pytest.raises(CheckpointError, match="scheme"):
        ckpt.resolve_checkpoint("http://example.com/x")


def test_pointer_cannot_escape_run_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best").write_text(json.dumps({"checkpoint": "../elsewhere"}))
    with pytest.raises(CheckpointError, match="escapes"):
        ckpt.resolve_checkpoint(run)


@pytest.mark.parametrize("wrapper", ["model_state_dict", "state_dict", None])
def test_legacy_pt_variants(tmp_path, wrapper):
    state = _model_state()
    ddp_state = {f"module.{k}": v for k, v in state.items()}
    obj = {wrapper: ddp_state, "epoch": 3, "best_acc": 91.0} if wrapper else ddp_state
    torch.save(obj, tmp_path / "best.pt")
    got = ckpt.load_legacy_pt(tmp_path / "best.pt")
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_legacy_pt_without_weights_is_an_error(tmp_path):
    torch.save({"epoch": 3}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="model_state_dict"):
        ckpt.load_legacy_pt(tmp_path / "x.pt")


def test_planted_pickle_in_legacy_pt_never_executes(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model_state_dict": {"w": torch.zeros(1)}, "x": _Payload(marker)}, f)
    torch.save({"model_state_dict": {"w": torch.zeros(1)}, "x": _Payload(marker)}, tmp_path / "evil2.pt")
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(CheckpointError, match=name):
            ckpt.load_legacy_pt(tmp_path / name)
    assert not marker.exists()


def test_planted_pickle_in_train_state_never_executes(tmp_path):
    marker = tmp_path / "pwned"
    c = _save(tmp_path / "c")
    torch.save({"epoch": 1, "x": _Payload(marker)}, os.path.join(c, "train_state.pt"))
    with pytest.raises(CheckpointError, match="train_state.pt"):
        ckpt.load_train_state(c)
    assert not marker.exists()


def test_corrupt_safetensors_is_checkpoint_error(tmp_path):
    c = _save(tmp_path / "c")
    with open(os.path.join(c, "model.safetensors"), "wb") as f:
        f.write(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        ckpt.load_model_state(c)


@pytest.mark.s3
def test_remote_checkpoint_round_trip(s3_env, tmp_path):
    state = _model_state()
    run = s3_env.uri("runs/run1")
    remote = s3_env.uri("runs/run1/checkpoint_000001")
    ckpt.save_checkpoint(remote, model_state=state, meta=_meta(), train_state={"epoch": 1})
    keys = {o["Key"] for o in s3_env.client().list_objects_v2(Bucket=s3_env.bucket)["Contents"]}
    assert keys == {f"runs/run1/checkpoint_000001/{n}" for n in ("model.safetensors", "meta.json", "train_state.pt")}
    assert ckpt.is_complete(remote) and not ckpt.is_complete(s3_env.uri("runs/run1/nope"))
    assert ckpt.load_meta(remote)["class_names"] == ["a", "b", "c"]
    loaded = ckpt.load_model_state(remote)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert ckpt.load_train_state(remote) == {"epoch": 1}

    ckpt.write_best_pointer(run, remote, {"val/top1": 9.0})
    pointer = s3_env.client().get_object(Bucket=s3_env.bucket, Key="runs/run1/best")["Body"].read()
    assert json.loads(pointer)["checkpoint"] == "checkpoint_000001"
    assert ckpt.resolve_checkpoint(run) == ckpt.ResolvedCheckpoint("folder", remote)
    assert ckpt.resolve_checkpoint(s3_env.uri("runs/run1/checkpoint_000001/")).uri == remote
    with pytest.raises(CheckpointNotFound, match="runs/missing"):
        ckpt.resolve_checkpoint(s3_env.uri("runs/missing"))

    torch.save({"model_state_dict": state}, tmp_path / "best.pt")
    s3_env.client().upload_file(str(tmp_path / "best.pt"), s3_env.bucket, "legacy/best.pt")
    legacy = s3_env.uri("legacy/best.pt")
    assert ckpt.resolve_checkpoint(legacy).kind == "legacy_pt"
    assert ckpt.load_legacy_pt(legacy).keys() == state.keys()
    with pytest.raises(CheckpointNotFound):
        ckpt.resolve_checkpoint(s3_env.uri("legacy/other.pt"))

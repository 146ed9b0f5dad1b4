"""model.py: timm models with a new head, pretrained weights from file / weights dir / hub, fine-tuning."""
import pytest
import safetensors.torch
import timm
import torch

from raytimm.checkpoint import save_checkpoint
from raytimm.errors import CheckpointError, ConfigError
from raytimm.model import build_model, classifier_prefixes, unwrap_model

NAME = "test_resnet"


def _body(state: dict, head: str = "fc.") -> dict:
    return {k: v for k, v in state.items() if not k.startswith(head)}


def _assert_same_body(a: dict, b: dict) -> None:
    body_a, body_b = _body(a), _body(b)
    assert body_a.keys() == body_b.keys()
    for k in body_a:
        assert torch.equal(body_a[k], body_b[k]), k


@pytest.fixture(scope="module")
def imagenet_model():
    """A 1000-class model with non-default weights, standing in for ImageNet-pretrained ones."""
    torch.manual_seed(123)
    return timm.create_model(NAME, num_classes=1000)


@pytest.fixture
def weights_file(tmp_path, imagenet_model):
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in imagenet_model.state_dict().items()}, str(path))
    return path


def test_head_reset_to_num_classes():
    model = build_model(NAME, num_classes=3)
    assert model.get_classifier().out_features == 3
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_pretrained_file_adapts_head_and_keeps_body(weights_file, imagenet_model):
    model = build_model(NAME, num_classes=3, pretrained_file=str(weights_file))
    assert model.get_classifier().out_features == 3
    _assert_same_body(model.state_dict(), imagenet_model.state_dict())


def test_weights_dir_env(tmp_path, monkeypatch, weights_file, imagenet_model):
    wdir = tmp_path / "weights"
    wdir.mkdir()
    weights_file.rename(wdir / f"{NAME}.safetensors")
    monkeypatch.setenv("RAYTIMM_WEIGHTS_DIR", str(wdir))
    model = build_model(NAME, num_classes=4, pretrained=True)
    assert model.get_classifier().out_features == 4
    _assert_same_body(model.state_dict(), imagenet_model.state_dict())


def test_pretrained_file_wins_over_weights_dir(tmp_path, monkeypatch, weights_file, imagenet_model):
    other = tmp_path / "other"
    other.mkdir()
    torch.manual_seed(7)
    decoy = timm.create_model(NAME, num_classes=1000).state_dict()
    safetensors.torch.save_file({k: v.contiguous() for k, v in decoy.items()}, str(other / f"{NAME}.safetensors"))
    monkeypatch.setenv("RAYTIMM_WEIGHTS_DIR", str(other))
    model = build_model(NAME, num_classes=3, pretrained=True, pretrained_file=str(weights_file))
    _assert_same_body(model.state_dict(), imagenet_model.state_dict())


def test_missing_pretrained_file_names_key(tmp_path):
    with pytest.raises(ConfigError, match="model.pretrained_file"):
        build_model(NAME, num_classes=3, pretrained_file=str(tmp_path / "nope.safetensors"))


def test_offline_hub_error_names_the_three_options(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # No network here anyway; offline mode makes the hub client fail at once instead of retrying.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("RAYTIMM_WEIGHTS_DIR", raising=False)
    with pytest.raises(ConfigError) as e:
        build_model(NAME, num_classes=3, pretrained=True)
    msg = str(e.value)
    assert "model.pretrained_file" in msg and "RAYTIMM_WEIGHTS_DIR" in msg and "network access" in msg
    assert "\n" not in msg


def test_unknown_model_name():
    with pytest.raises(ConfigError, match="not_a_model"):
        build_model("not_a_model", num_classes=3)


def test_init_checkpoint_folder_skips_head_when_class_count_differs(tmp_path):
    torch.manual_seed(1)
    src = build_model(NAME, num_classes=5)
    save_checkpoint(tmp_path / "ck", model_state=src.state_dict(),
                    meta={"model_name": NAME, "num_classes": 5, "class_names": list("abcde")}, train_state=None)
    model = build_model(NAME, num_classes=3, init_checkpoint=str(tmp_path / "ck"))
    _assert_same_body(model.state_dict(), src.state_dict())
    assert model.get_classifier().out_features == 3

    same = build_model(NAME, num_classes=5, init_checkpoint=str(tmp_path / "ck"))
    for k, v in src.state_dict().items():
        assert torch.equal(same.state_dict()[k], v), k


def test_init_checkpoint_legacy_pt(tmp_path):
    torch.manual_seed(2)
    src = build_model(NAME, num_classes=3)
    # The platform's earlier service saved DDP-wrapped keys inside a dict with extra fields.
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    torch.save({"model_state_dict": state, "epoch": 7, "best_acc": 0.9}, tmp_path / "best.pt")
    model = build_model(NAME, num_classes=3, init_checkpoint=str(tmp_path / "best.pt"))
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_init_checkpoint_wrong_architecture(tmp_path):
    other = timm.create_model("test_efficientnet", num_classes=3)
    torch.save({"model_state_dict": other.state_dict()}, tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match="does not fit"):
        build_model(NAME, num_classes=3, init_checkpoint=str(tmp_path / "best.pt"))


def test_img_size_only_for_models_that_take_it():
    vit = build_model("test_vit", num_classes=3, img_size=64)
    assert vit.patch_embed.img_size == (64, 64)
    assert vit(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    cnn = build_model(NAME, num_classes=3, img_size=64)  # a CNN ignores it (data config only)
    assert cnn(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_unwrap_model():
    model = build_model(NAME, num_classes=3)
    assert unwrap_model(model) is model
    assert unwrap_model(torch.nn.DataParallel(model)) is model
    compiled = torch.compile(model)  # wrapping only; nothing is compiled until the first call
    assert unwrap_model(compiled) is model
    assert classifier_prefixes(model) == ["fc."]


@pytest.mark.s3
def test_pretrained_file_uri_is_downloaded_once(s3_env, tmp_path, weights_file, imagenet_model):
    s3_env.client().upload_file(str(weights_file), s3_env.bucket, "weights/test_resnet.safetensors")
    uri = s3_env.uri("weights/test_resnet.safetensors")
    cache = tmp_path / "cache"
    model = build_model(NAME, num_classes=3, pretrained_file=uri, cache_dir=str(cache))
    _assert_same_body(model.state_dict(), imagenet_model.state_dict())
    cached = list(cache.glob("weights/*/test_resnet.safetensors"))
    assert len(cached) == 1
    # A second build reads the cached copy: it still works after the object is gone.
    s3_env.client().delete_object(Bucket=s3_env.bucket, Key="weights/test_resnet.safetensors")
    again = build_model(NAME, num_classes=3, pretrained_file=uri, cache_dir=str(cache))
    _assert_same_body(again.state_dict(), imagenet_model.state_dict())

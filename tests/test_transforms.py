"""Transforms: data config resolution, train/eval pipelines, timm's eval geometry, normalisation."""
import json
import pickle

import cv2
import numpy as np
import pytest
import timm
import timm.data
import torch
from PIL import Image

from raytimm.data.transforms import (
    build_eval_transform,
    build_train_transform,
    cv2_interpolation,
    eval_resize_size,
    resolve_data_config,
)
from raytimm.errors import ConfigError

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _config(size=(32, 32), crop_pct=0.875, interpolation="bilinear", crop_mode="center", **stats):
    return {"input_size": [3, *size], "interpolation": interpolation, "crop_pct": crop_pct,
            "crop_mode": crop_mode, **(stats or IMAGENET)}


def _gradient(h, w):
    """A smooth image whose colour encodes position, so a geometry error shows up as a value error."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 / (w - 1), yy * 255 / (h - 1), (xx + yy) * 255 / (h + w - 2)], -1).astype(np.uint8)


def _noise(h=40, w=50, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------- data config


def test_data_config_from_name_matches_model_and_is_json():
    by_name = resolve_data_config("test_resnet")
    by_model = resolve_data_config(timm.create_model("test_resnet", pretrained=False))
    assert by_name == by_model
    assert set(by_name) == {"input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode"}
    assert json.loads(json.dumps(by_name)) == by_name  # plain lists and numbers
    assert isinstance(by_name["input_size"], list) and isinstance(by_name["mean"], list)
    assert by_name["input_size"] == [3, 160, 160] and by_name["interpolation"] == "bilinear"


def test_data_config_uses_test_size_and_img_size_overrides():
    cfg = resolve_data_config("resnet18")  # timm: train 224, test 288 with crop 1.0
    assert cfg["input_size"] == [3, 288, 288] and cfg["crop_pct"] == 1.0
    train_cfg = resolve_data_config("resnet18", use_test_size=False)
    assert train_cfg["input_size"] == [3, 224, 224] and train_cfg["crop_pct"] == 0.95
    small = resolve_data_config("resnet18", img_size=64)
    assert small["input_size"] == [3, 64, 64] and small["crop_pct"] == 0.95
    assert resolve_data_config("resnet18", img_size=(48, 64))["input_size"] == [3, 48, 64]


def test_data_config_sees_through_wrappers():
    class Wrapper(torch.nn.Module):  # what DDP looks like from the outside
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = timm.create_model("test_vit", pretrained=False)
    assert resolve_data_config(Wrapper(model)) == resolve_data_config(model)


def test_unknown_model_name_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown timm model name 'resnet181'.*did you mean"):
        resolve_data_config("resnet181")


# ----------------------------------------------------------------------------------------------- eval


def test_eval_output_shape_dtype_and_determinism():
    transform = build_eval_transform(_config((32, 32)))
    image = _noise()
    first, second = transform(image), transform(image)
    assert first.shape == (3, 32, 32) and first.dtype == torch.float32
    assert torch.equal(first, second)


@pytest.mark.parametrize("transform_kind", ["eval", "train"])
def test_normalisation_statistics(transform_kind):
    config = _config((16, 16))
    # Colour jitter changes brightness by design, so the train check runs with it off.
    transform = build_eval_transform(config) if transform_kind == "eval" else build_train_transform(config, color_jitter=0)
    mean_image = np.empty((24, 24, 3), np.float64)
    mean_image[:] = np.array(IMAGENET["mean"]) * 255
    out = transform(np.round(mean_image).astype(np.uint8))
    assert out.abs().max() < 0.02  # the mean colour maps to ~0
    if transform_kind == "eval":
        white = transform(np.full((24, 24, 3), 255, np.uint8))
        expected = (1 - np.array(IMAGENET["mean"])) / np.array(IMAGENET["std"])
        assert np.allclose(white[:, 0, 0].numpy(), expected, atol=1e-5)


def test_eval_resize_size_follows_timm():
    assert eval_resize_size(_config((224, 224), crop_pct=0.875)) == (256, 256)
    assert eval_resize_size(_config((224, 224), crop_pct=0.95)) == (235, 235)  # floor(235.79)


@pytest.mark.parametrize(
    "image_hw,size,crop_pct,interpolation,mode",
    [
        ((200, 300), (224, 224), 0.875, "bilinear", "center"),  # upscale, landscape
        ((600, 400), (224, 224), 0.875, "bicubic", "center"),  # downscale, portrait
        ((60, 90), (32, 32), 0.875, "bilinear", "center"),
        ((600, 400), (224, 160), 0.875, "bilinear", "center"),  # non-square target
        ((600, 400), (224, 224), 0.875, "bilinear", "squash"),
        ((300, 300), (288, 288), 1.0, "bicubic", "center"),
    ],
)
def test_eval_geometry_matches_timm(image_hw, size, crop_pct, interpolation, mode):
    config = _config(size, crop_pct, interpolation, mode)
    image = _gradient(*image_hw)
    ours = build_eval_transform(config)(image)
    theirs = timm.data.create_transform(
        input_size=tuple(config["input_size"]), interpolation=interpolation, crop_pct=crop_pct,
        crop_mode=mode, mean=tuple(IMAGENET["mean"]), std=tuple(IMAGENET["std"]), is_training=False,
    )(Image.fromarray(image))
    assert ours.shape == theirs.shape
    # A one-pixel shift of this gradient moves values by ~0.015-0.06; interpolation libraries differ less.
    assert (ours - theirs).abs().max() < 0.05
    assert (ours - theirs).abs().mean() < 0.01  # rounding: at most one grey level here and there


def test_geometry_check_would_catch_a_wrong_crop():
    image = _gradient(200, 300)
    right = build_eval_transform(_config((224, 224), 0.875))(image)
    wrong = build_eval_transform(_config((224, 224), 1.0))(image)
    assert (right - wrong).abs().mean() > 0.05


def test_crop_pct_above_one_pads_to_size():
    out = build_eval_transform(_config((32, 32), crop_pct=1.5))(_noise(40, 40))
    assert out.shape == (3, 32, 32)


def test_interpolation_names_map_to_cv2_flags():
    assert cv2_interpolation("bicubic") == cv2.INTER_CUBIC
    assert cv2_interpolation("BILINEAR") == cv2.INTER_LINEAR
    assert cv2_interpolation("nearest") == cv2.INTER_NEAREST
    assert cv2_interpolation("lanczos") == cv2.INTER_LANCZOS4
    with pytest.raises(ConfigError, match="unknown interpolation 'sinc'"):
        cv2_interpolation("sinc")


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"input_size": [3, 32]}, "input_size"),
        ({"input_size": [1, 32, 32]}, "input_size"),
        ({"mean": [0.5]}, "mean"),
        ({"std": [0.5, 0.0, 0.5]}, "std must be positive"),
        ({"crop_mode": "zoom"}, "crop_mode"),
    ],
)
def test_bad_data_config_is_a_config_error(bad, match):
    with pytest.raises(ConfigError, match=match):
        build_eval_transform({**_config(), **bad})


# ---------------------------------------------------------------------------------------------- train


def test_train_output_shape_and_dtype():
    out = build_train_transform(_config((24, 20)))(_noise(50, 70))
    assert out.shape == (3, 24, 20) and out.dtype == torch.float32


def test_train_with_everything_off_is_a_plain_resize():
    config = _config((16, 16))
    plain = build_train_transform(config, rrc=False, hflip=0, color_jitter=0)
    image = _noise(16, 16)
    expected = (torch.from_numpy(image).permute(2, 0, 1).float() / 255
                - torch.tensor(IMAGENET["mean"])[:, None, None]) / torch.tensor(IMAGENET["std"])[:, None, None]
    assert torch.allclose(plain(image), expected, atol=1e-5)
    assert torch.equal(plain(image), plain(image))


def test_each_augmentation_does_something():
    config = _config((16, 16))
    image = _noise(16, 16)
    base = build_train_transform(config, rrc=False, hflip=0, color_jitter=0)(image)
    flipped = build_train_transform(config, rrc=False, hflip=1.0, color_jitter=0)(image)
    assert torch.equal(flipped, base.flip(-1))
    jittered = build_train_transform(config, rrc=False, hflip=0, color_jitter=0.4, seed=0)(image)
    assert not torch.allclose(jittered, base, atol=1e-3)
    cropped = build_train_transform(config, rrc=True, rrc_scale=(0.1, 0.2), hflip=0, color_jitter=0, seed=0)(image)
    assert not torch.allclose(cropped, base, atol=1e-3)


def test_train_seed_makes_augmentation_reproducible():
    image = _noise()
    a = build_train_transform(_config(), seed=5)
    b = build_train_transform(_config(), seed=5)
    outs_a, outs_b = [a(image) for _ in range(3)], [b(image) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(outs_a, outs_b))
    assert not torch.equal(outs_a[0], outs_a[1])  # but it is random from call to call


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rrc_scale": (0.5, 0.1)}, "rrc_scale"),
        ({"rrc_scale": (0.0, 1.0)}, "rrc_scale"),
        ({"rrc_ratio": (2.0, 1.0)}, "rrc_ratio"),
        ({"hflip": 1.5}, "hflip"),
        ({"color_jitter": -0.1}, "color_jitter"),
    ],
)
def test_bad_train_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_train_transform(_config(), **kwargs)


class _Augmented(torch.utils.data.Dataset):
    def __init__(self, transform):
        self.transform = transform
        self.image = _noise(32, 32)

    def __len__(self):
        return 2

    def __getitem__(self, index):
        return self.transform(self.image)


def test_dataloader_workers_do_not_repeat_each_others_augmentations():
    transform = build_train_transform(_config((16, 16)))
    loader = torch.utils.data.DataLoader(_Augmented(transform), batch_size=1, num_workers=2,
                                         multiprocessing_context="fork")
    first, second = list(loader)  # item 0 from worker 0, item 1 from worker 1
    assert not torch.equal(first, second)


def test_transforms_pickle():
    for transform in (build_train_transform(_config()), build_eval_transform(_config())):
        clone = pickle.loads(pickle.dumps(transform))
        assert clone(_noise()).shape == (3, 32, 32)

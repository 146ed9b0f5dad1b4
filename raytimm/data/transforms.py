"""albumentations pipelines built from timm's resolved data config.

`build_eval_transform` is the one eval path: training's validation, `raytimm evaluate` and Serve all
call it with the data config stored in the checkpoint, so there is no train/serve skew.
"""
from __future__ import annotations

import difflib
import math
import os
from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

from raytimm.errors import ConfigError

# timm interpolation names -> OpenCV flags. cv2 has no Hamming filter; bilinear is closest.
# "random" is a train-time choice in timm; a fixed bilinear keeps our pipelines deterministic in kind.
CV2_INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4,
    "box": cv2.INTER_AREA,
    "area": cv2.INTER_AREA,
    "hamming": cv2.INTER_LINEAR,
    "random": cv2.INTER_LINEAR,
}
DATA_CONFIG_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
DEFAULT_CROP_PCT = 0.875  # timm's DEFAULT_CROP_PCT


def cv2_interpolation(name: str) -> int:
    """The OpenCV flag for a timm interpolation name (ConfigError when unknown)."""
    try:
        return CV2_INTERPOLATION[str(name).lower()]
    except KeyError:
        raise ConfigError(
            f"unknown interpolation {name!r} in data config; expected one of {', '.join(CV2_INTERPOLATION)}"
        ) from None


def resolve_data_config(
    model_or_name: torch.nn.Module | str,
    img_size: int | Sequence[int] | None = None,
    *,
    use_test_size: bool = True,
) -> dict:
    """timm's resolved data config for a model or model name, as a plain JSON-able dict.

    Keys: input_size [3, H, W], mean, std, interpolation, crop_pct, crop_mode. The model's test-time
    size (and test crop) is used where it defines one, timm's inference convention; `img_size`
    overrides the size, and then the model's ordinary crop_pct applies (its test crop belongs to its
    test size).
    """
    import timm
    import timm.data

    test_size = use_test_size and img_size is None
    if isinstance(model_or_name, str):
        cfg = _config_for_name(model_or_name, test_size)
    else:
        model = model_or_name
        # DDP wraps in .module, torch.compile in ._orig_mod; the pretrained_cfg lives on the inner model.
        while hasattr(model, "module") or hasattr(model, "_orig_mod"):
            model = getattr(model, "_orig_mod", None) or model.module
        cfg = timm.data.resolve_model_data_config(model, use_test_size=test_size)
    input_size = [int(v) for v in cfg["input_size"]]
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if int(h) < 1 or int(w) < 1:
            raise ConfigError(f"model.img_size must be positive, got {img_size!r}")
        input_size = [input_size[0], int(h), int(w)]
    return {
        "input_size": input_size,
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "interpolation": str(cfg["interpolation"]),
        "crop_pct": float(cfg.get("crop_pct") or DEFAULT_CROP_PCT),
        "crop_mode": str(cfg.get("crop_mode") or "center"),
    }


def _config_for_name(name: str, use_test_size: bool) -> dict:
    """Data config from the registered pretrained cfg, building the model (on the meta device) only if needed."""
    import timm
    import timm.data
    from timm.models import get_pretrained_cfg

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown timm model name {name!r}{hint}")
    try:
        pretrained_cfg = get_pretrained_cfg(name)
    except RuntimeError as exc:  # a bad pretrained tag
        raise ConfigError(f"model name {name!r}: {exc}") from None
    if pretrained_cfg is not None:
        return timm.data.resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict(), use_test_size=use_test_size)
    with torch.device("meta"):  # no weights are allocated
        model = timm.create_model(name, pretrained=False)
    return timm.data.resolve_model_data_config(model, use_test_size=use_test_size)


def check_data_config(data_config: dict) -> tuple[int, int]:
    """Validate a data config dict (ConfigError naming the key) and return its (H, W)."""
    missing = [k for k in ("input_size", "mean", "std") if k not in data_config]
    if missing:
        raise ConfigError(f"data config is missing {', '.join(missing)}; expected keys {', '.join(DATA_CONFIG_KEYS)}")
    size = list(data_config["input_size"])
    if len(size) != 3 or size[0] != 3 or min(size) < 1:
        raise ConfigError(f"data config input_size must be [3, H, W], got {data_config['input_size']!r}")
    for key in ("mean", "std"):
        if len(data_config[key]) != 3:
            raise ConfigError(f"data config {key} must have 3 values (RGB), got {data_config[key]!r}")
    if any(float(s) <= 0 for s in data_config["std"]):
        raise ConfigError(f"data config std must be positive, got {data_config['std']!r}")
    crop_pct = data_config.get("crop_pct") or DEFAULT_CROP_PCT
    if not 0 < float(crop_pct) <= 2:
        raise ConfigError(f"data config crop_pct must be in (0, 2], got {crop_pct!r}")
    return int(size[1]), int(size[2])


class AlbumentationsTransform:
    """Callable HxWx3 uint8 RGB array -> float32 CHW tensor, wrapping an albumentations Compose.

    Random pipelines reseed themselves once per DataLoader worker from torch's per-worker seed:
    forked workers would otherwise share one RNG state and repeat each other's augmentations.
    """

    def __init__(self, pipeline: A.Compose, *, random: bool):
        self.pipeline = pipeline
        self.random = random
        self._seeded_for: tuple | None = None

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        if self.random:
            self._reseed_for_worker()
        out = self.pipeline(image=image)["image"]
        return out.contiguous() if out.dtype == torch.float32 else out.float().contiguous()

    def _reseed_for_worker(self) -> None:
        info = torch.utils.data.get_worker_info()
        if info is None:
            return
        key = (os.getpid(), info.seed)
        if key != self._seeded_for:
            self._seeded_for = key
            self.pipeline.set_random_seed(info.seed % 2**32)

    def __repr__(self) -> str:
        return f"AlbumentationsTransform({self.pipeline!r})"


def _normalize_to_tensor(data_config: dict) -> list:
    mean = tuple(float(v) for v in data_config["mean"])
    std = tuple(float(v) for v in data_config["std"])
    return [A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()]


def build_train_transform(
    data_config: dict,
    *,
    rrc: bool = True,
    rrc_scale: Sequence[float] = (0.08, 1.0),
    rrc_ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    color_jitter: float = 0.4,
    seed: int | None = None,
) -> AlbumentationsTransform:
    """Training pipeline: RandomResizedCrop (or Resize), flip, colour jitter (each can be off), normalise."""
    height, width = check_data_config(data_config)
    interpolation = cv2_interpolation(data_config.get("interpolation", "bilinear"))
    scale, ratio = tuple(float(v) for v in rrc_scale), tuple(float(v) for v in rrc_ratio)
    if rrc and (len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1):
        raise ConfigError(f"data.rrc_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {list(rrc_scale)}")
    if rrc and (len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]):
        raise ConfigError(f"data.rrc_ratio must be [lo, hi] with 0 < lo <= hi, got {list(rrc_ratio)}")
    if not 0 <= hflip <= 1:
        raise ConfigError(f"data.hflip is a probability in [0, 1], got {hflip!r}")
    if color_jitter < 0:
        raise ConfigError(f"data.color_jitter must be >= 0 (0 = off), got {color_jitter!r}")

    if rrc:
        ops = [A.RandomResizedCrop(size=(height, width), scale=scale, ratio=ratio, interpolation=interpolation,
                                   area_for_downscale="image")]
    else:
        ops = [A.Resize(height, width, interpolation=interpolation, area_for_downscale="image")]
    if hflip > 0:
        ops.append(A.HorizontalFlip(p=float(hflip)))
    if color_jitter > 0:
        # timm's colour jitter: brightness/contrast/saturation by the same strength, no hue, every image.
        cj = float(color_jitter)
        ops.append(A.ColorJitter(brightness=cj, contrast=cj, saturation=cj, hue=0.0, p=1.0))
    ops += _normalize_to_tensor(data_config)
    return AlbumentationsTransform(A.Compose(ops, seed=seed), random=True)


def eval_resize_size(data_config: dict) -> tuple[int, int]:
    """The (H, W) the eval transform scales to before its centre crop: floor(size / crop_pct), as timm does."""
    height, width = check_data_config(data_config)
    crop_pct = float(data_config.get("crop_pct") or DEFAULT_CROP_PCT)
    return math.floor(height / crop_pct), math.floor(width / crop_pct)


def build_eval_transform(data_config: dict) -> AlbumentationsTransform:
    """THE eval pipeline (train-val, evaluate, serve): timm's resize -> centre crop -> normalise. Deterministic."""
    height, width = check_data_config(data_config)
    interpolation = cv2_interpolation(data_config.get("interpolation", "bilinear"))
    scale_h, scale_w = eval_resize_size(data_config)
    mode = str(data_config.get("crop_mode") or "center")
    fill = 0.0
    if mode == "squash":
        # Each side to size/crop_pct regardless of aspect, then crop: nothing lost when crop_pct == 1.
        resize = A.Resize(scale_h, scale_w, interpolation=interpolation, area_for_downscale="image")
    elif mode == "border":
        # The whole image fits inside size/crop_pct; the border is filled with the mean colour.
        resize = A.LongestMaxSize(max_size_hw=(scale_h, scale_w), interpolation=interpolation,
                                  area_for_downscale="image")
        fill = tuple(round(255 * float(v)) for v in data_config["mean"])
    elif mode == "center":
        # Shorter side to size/crop_pct keeping aspect (for non-square targets: cover both sides).
        if scale_h == scale_w:
            resize = A.SmallestMaxSize(max_size=scale_h, interpolation=interpolation, area_for_downscale="image")
        else:
            resize = A.SmallestMaxSize(max_size_hw=(scale_h, scale_w), interpolation=interpolation,
                                       area_for_downscale="image")
    else:
        raise ConfigError(f"unknown crop_mode {mode!r} in data config; expected center, squash or border")
    # pad_if_needed covers crop_pct > 1 and border mode, where the resized image is smaller than the crop.
    crop = A.CenterCrop(height, width, pad_if_needed=True, fill=fill)
    return AlbumentationsTransform(A.Compose([resize, crop, *_normalize_to_tensor(data_config)]), random=False)

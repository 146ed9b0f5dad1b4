"""Model construction: timm models with a fresh head, pretrained weights from file/dir/hub, fine-tuning.

Pretrained weights resolve in this order (README "Train", docs/internals.md "model.py"):

1. ``model.pretrained_file`` — a local path or an ``s3://``/``r2://`` URI (downloaded to a cache);
2. ``$RAYTIMM_WEIGHTS_DIR/<model name>.safetensors``;
3. timm's hub download.

Files go through ``timm.create_model(..., pretrained_cfg_overlay=dict(file=...))`` so timm itself
adapts the classifier (and e.g. ViT position embeddings) to ``num_classes``; ``checkpoint_path=``
would load exactly and not adapt the head.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import timm
from torch import nn

from raytimm.envvars import WEIGHTS_DIR_ENV
from raytimm.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "~/.cache/raytimm"


def build_model(
    name: str,
    *,
    num_classes: int,
    pretrained: bool = False,
    pretrained_file: str | None = None,
    init_checkpoint: str | None = None,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    img_size: int | None = None,
    weights_dir: str | None = None,
    cache_dir: str | None = None,
) -> nn.Module:
    """Create a timm model with a ``num_classes`` head, optionally from pretrained weights or a checkpoint."""
    kwargs: dict[str, Any] = dict(num_classes=num_classes, drop_rate=drop_rate)
    if drop_path_rate:
        # Not every model accepts drop_path_rate; only pass it when asked for.
        kwargs["drop_path_rate"] = drop_path_rate
    weights_file = None
    if pretrained or pretrained_file:
        weights_file = resolve_pretrained_file(name, pretrained_file, weights_dir=weights_dir, cache_dir=cache_dir)
        kwargs["pretrained"] = True
        if weights_file is not None:
            kwargs["pretrained_cfg_overlay"] = dict(file=weights_file)
    model = _create(name, kwargs, img_size=img_size, weights_file=weights_file)
    if init_checkpoint:
        load_init_checkpoint(model, init_checkpoint)
    return model


def _create(name: str, kwargs: dict, *, img_size: int | None, weights_file: str | None) -> nn.Module:
    """timm.create_model with friendly errors; ``img_size`` only for models whose constructor takes it."""
    try:
        if img_size is not None:
            try:
                return timm.create_model(name, img_size=img_size, **kwargs)
            except TypeError as e:
                # CNNs have no img_size argument: the size then only changes the data config.
                if "img_size" not in str(e):
                    raise
        return timm.create_model(name, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(f"model.name={name!r} is not a timm model (see timm.list_models())") from e
        if weights_file is not None:
            raise ConfigError(f"pretrained weights {weights_file} do not fit model {name!r}: "
                              f"{_first_line(e)}") from e
        raise
    except (OSError, ConnectionError) as e:
        if weights_file is not None:
            raise ConfigError(f"cannot read pretrained weights {weights_file} for model {name!r}: "
                              f"{_first_line(e)}") from e
        if kwargs.get("pretrained"):
            raise ConfigError(_offline_message(name, e)) from e
        raise
    except Exception as e:  # noqa: BLE001 - hub clients raise their own HTTP error types
        if weights_file is None and kwargs.get("pretrained") and _looks_like_network_error(e):
            raise ConfigError(_offline_message(name, e)) from e
        raise


def _offline_message(name: str, err: BaseException) -> str:
    return (f"cannot download pretrained weights for {name!r} from the Hugging Face hub ({type(err).__name__}); "
            f"set model.pretrained_file to a weights file or URI, put {name}.safetensors in "
            f"${WEIGHTS_DIR_ENV}, or give this machine network access to the hub")


def _looks_like_network_error(err: BaseException) -> bool:
    module = type(err).__module__ or ""
    return module.startswith(("huggingface_hub", "httpx", "requests", "urllib3", "urllib"))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def resolve_pretrained_file(name: str, pretrained_file: str | None, *, weights_dir: str | None = None,
                            cache_dir: str | None = None) -> str | None:
    """Local weights file to load (options 1 and 2), or None to fall back to timm's hub download."""
    if pretrained_file:
        return _local_weights(pretrained_file, cache_dir=cache_dir)
    weights_dir = weights_dir or os.environ.get(WEIGHTS_DIR_ENV)
    if weights_dir:
        # "resnet50.a1_in1k" may be stored under its full name or its architecture name.
        for stem in dict.fromkeys([name, name.split(".", 1)[0]]):
            candidate = Path(weights_dir).expanduser() / f"{stem}.safetensors"
            if candidate.is_file():
                log.info("pretrained weights for %s from %s", name, candidate)
                return str(candidate)
        log.info("no %s.safetensors in %s=%s; trying the hub", name, WEIGHTS_DIR_ENV, weights_dir)
    return None


def _local_weights(uri: str, *, cache_dir: str | None) -> str:
    """A local path for ``uri``: remote files are downloaded once into the node cache."""
    from raytimm import storage
    from raytimm.checkpoint import is_remote_uri  # knows the schemes we accept

    if is_remote_uri(uri):
        digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
        target = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / "weights" / digest / uri.rstrip("/").rsplit("/", 1)[-1]
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            # Download beside the target and rename, so concurrent workers never read half a file.
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            storage.download(uri, str(tmp))
            os.replace(tmp, target)
        return str(target)
    path = Path(storage.local_path(uri))
    if not path.is_file():
        raise ConfigError(f"model.pretrained_file={uri!r} does not exist")
    return str(path)


def classifier_prefixes(model: nn.Module) -> list[str]:
    """State-dict prefixes of the model's classifier head(s), from timm's pretrained_cfg."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    if isinstance(names, str):
        names = (names,)
    return [f"{n}." for n in names]


def _is_head_key(key: str, prefixes: Iterable[str]) -> bool:
    return any(key.startswith(p) for p in prefixes)


def load_init_checkpoint(model: nn.Module, uri: str) -> list[str]:
    """Load a raytimm checkpoint / run folder / legacy .pt into ``model``; returns the head keys skipped.

    The classifier is skipped when its shape differs (a different class count); every other
    weight must match, otherwise the checkpoint is for a different architecture.
    """
    from raytimm import checkpoint as ckpt

    resolved = ckpt.resolve_checkpoint(uri)
    if resolved.kind == "onnx":
        raise CheckpointError(f"model.init_checkpoint={uri!r} is an ONNX export, which has no trainable weights; "
                              "give the checkpoint it was exported from (source_checkpoint in its meta.json)")
    if resolved.kind == "legacy_pt":
        state = ckpt.load_legacy_pt(resolved.uri)
    else:
        state = ckpt.load_model_state(resolved.uri)
    own = model.state_dict()
    heads = classifier_prefixes(model)
    skipped, filtered, bad = [], {}, []
    for key, value in state.items():
        if key not in own:
            if not _is_head_key(key, heads):
                bad.append(f"unexpected {key}")
            continue
        if tuple(value.shape) != tuple(own[key].shape):
            if _is_head_key(key, heads):
                skipped.append(key)
                continue
            bad.append(f"{key} shape {tuple(value.shape)} != {tuple(own[key].shape)}")
            continue
        filtered[key] = value
    missing = [k for k in own if k not in state and not _is_head_key(k, heads)]
    bad += [f"missing {k}" for k in missing]
    if bad:
        raise CheckpointError(f"model.init_checkpoint={uri!r} does not fit this model: {len(bad)} mismatched "
                              f"weights, e.g. {'; '.join(bad[:3])} (is it the same model.name?)")
    skipped += [k for k in own if k not in state and _is_head_key(k, heads)]
    model.load_state_dict(filtered, strict=False)
    if skipped:
        log.warning("init_checkpoint %s: classifier not loaded (different class count): %s",
                    resolved.uri, ", ".join(sorted(set(skipped))))
    else:
        log.info("init_checkpoint %s: all weights loaded", resolved.uri)
    return sorted(set(skipped))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP/DataParallel (``.module``) and torch.compile (``_orig_mod``)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model

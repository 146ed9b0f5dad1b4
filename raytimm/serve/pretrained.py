"""What a request may make a replica build: the pretrained-mode guard of /inference/quick. No Ray imports.

A request names a timm architecture (``model_name``). Building one costs what its parameters cost
(vit_gigantic_patch14_clip_224: ~8 GB and a minute and a half of CPU), so everything is decided
before anything is built or any weights file is read, in this order, cheapest first:

1. a timm model name at all (``check_pretrained_name``)                       -> 422
2. allowed: ``--allow-models``, or by default the shipped targets plus the
   models with ``<name>.safetensors`` in the weights folder                    -> 422
3. weights available: that file, or the hub where ``--allow-hub`` is on       -> 404
4. at most ``--max-model-params`` parameters, counted on the ``meta`` device
   (which allocates no memory) and cached per name                            -> 422

The ingress checks only the name's syntax (it does not import timm or torch, ~850 MB resident);
``ModelServer.check_model`` runs the rest in the model replica, which has both loaded already and the
weights folder the model would be loaded from.
"""
from __future__ import annotations

import functools
import threading
from typing import Iterable, Optional

from raytimm.serve.http import HTTPError, check_pretrained_name

# The targets shipped as configs/train/<name>.yaml (tests/test_serve_guard.py keeps them in step).
SHIPPED_TARGETS = frozenset({
    "resnet18", "resnet34", "resnet50", "resnet101", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2",
    "vit_small_patch16_224", "vit_base_patch16_224", "mobilenetv3_large_100", "mobilenetv3_small_100",
})
ANY_MODEL = "*"

_count_lock = threading.Lock()


def architecture(name: str) -> str:
    """``resnet50.a1_in1k`` -> ``resnet50`` (timm's pretrained tag removed)."""
    return name.split(".", 1)[0]


def local_weights(name: str, weights_dir: Optional[str]) -> Optional[str]:
    """``<weights_dir>/<name>.safetensors`` (or the architecture's) when it is a file; nothing is read."""
    if not weights_dir:
        return None
    from raytimm.model import resolve_pretrained_file
    return resolve_pretrained_file(name, None, weights_dir=weights_dir)


def is_allowed(name: str, allow_models: Iterable[str], weights_dir: Optional[str]) -> bool:
    """Whether ``name`` may be built: in ``allow_models`` (or ``*``), else a shipped target or a local weights file."""
    allow = {a.strip() for a in allow_models if a and a.strip()}
    if allow:
        return ANY_MODEL in allow or name in allow or architecture(name) in allow
    return architecture(name) in SHIPPED_TARGETS or local_weights(name, weights_dir) is not None


@functools.lru_cache(maxsize=512)
def param_count(name: str) -> int:
    """Parameters of timm model ``name``, built on the ``meta`` device: no memory, no weights, no download."""
    import timm
    import torch
    # One at a time: building is Python-bound (seconds for the largest models), threads would only contend.
    with _count_lock, torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    return sum(p.numel() for p in model.parameters())


def check_model_size(name: str, max_params: int) -> int:
    """422 when ``name`` has more than ``max_params`` parameters (or cannot be sized); its parameter count."""
    try:
        count = param_count(name)
    except Exception as exc:  # noqa: BLE001 - a model that cannot even be sized is not built either
        raise HTTPError(422, f"model_name {name!r} cannot be sized without building it "
                             f"({type(exc).__name__}); it is not served") from None
    if count > max_params:
        raise HTTPError(422, f"model_name {name!r} has {count / 1e6:,.1f}M parameters, more than this server's "
                             f"limit of {max_params / 1e6:,.1f}M (--max-model-params)")
    return count


def check_pretrained_request(name: str, *, allow_models: Iterable[str], max_params: int,
                             weights_dir: Optional[str], allow_hub: bool) -> Optional[str]:
    """The whole guard (422/404 as in the module doc); the local weights file, or None to use the hub."""
    check_pretrained_name(name)
    if not is_allowed(name, allow_models, weights_dir):
        raise HTTPError(422, f"model_name {name!r} is not allowed on this server: it serves the shipped targets "
                             f"and models with weights in its weights folder (--allow-models to change)")
    weights = available_weights(name, weights_dir, allow_hub)
    check_model_size(name, max_params)
    return weights


def available_weights(name: str, weights_dir: Optional[str], allow_hub: bool) -> Optional[str]:
    """The local weights file of ``name``; None when the hub may be used; 404 when neither (nothing is built)."""
    weights = local_weights(name, weights_dir)
    if weights is None and not allow_hub:
        where = f"{weights_dir}/{architecture(name)}.safetensors" if weights_dir else "a weights folder"
        raise HTTPError(404, f"no pretrained weights for {name!r}: put them in {where} "
                             f"(--weights-dir / $RAYTIMM_WEIGHTS_DIR), or start the server with --allow-hub")
    return weights

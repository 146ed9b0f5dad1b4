"""The platform's TrainingRequest JSON (`raytimm train --request`, the training API) mapped onto a Config.

No torch or ray imports, like config.py: the CLI and the training API validate a request in milliseconds.
"""
from __future__ import annotations

import json
import os

from raytimm.config import (
    Config,
    apply_overrides,
    closest_hint,
    config_from_dict,
    config_to_dict,
    load_config,
    read_text,
)
from raytimm.errors import ConfigError

REQUEST_FIELDS = {
    "training_job_id", "project_id", "framework", "model_name", "num_classes", "dataset_path",
    "dataset_format", "epochs", "batch_size", "learning_rate", "checkpoint_path", "img_size",
}
_REQUIRED = ("training_job_id", "project_id", "model_name", "dataset_path")


def request_to_config(req: dict, *, source: str = "request", base: Config | None = None) -> Config:
    """Map the platform's TrainingRequest JSON onto a Config."""
    if not isinstance(req, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    unknown = sorted(set(req) - REQUEST_FIELDS)
    if unknown:
        k = unknown[0]
        raise ConfigError(f"{source}: unknown field {k!r}{closest_hint(k, sorted(REQUEST_FIELDS))}")
    for k in _REQUIRED:
        if req.get(k) in (None, ""):
            raise ConfigError(f"{source}: missing required field {k!r}")
    framework = req.get("framework", "timm")
    if framework != "timm":
        raise ConfigError(f"{source}: framework={framework!r} is not supported: raytimm trains 'timm' models only")
    fmt = str(req.get("dataset_format") or "imagefolder").lower()
    if fmt not in ("imagefolder", "dice"):
        raise ConfigError(f"{source}: dataset_format={fmt!r} is not allowed: expected 'imagefolder' or 'dice'")
    d = config_to_dict(base or Config())
    d["run"]["name"] = f"job_{req['training_job_id']}"
    d["mlflow"]["experiment"] = f"project_{req['project_id']}"
    d["model"]["name"] = req["model_name"]
    d["data"]["path"] = req["dataset_path"]
    d["data"]["format"] = fmt
    mapping = {
        "num_classes": ("model", "num_classes"),
        "img_size": ("model", "img_size"),
        "epochs": ("train", "epochs"),
        "batch_size": ("train", "batch_size"),
        "learning_rate": ("train", "lr"),
        "checkpoint_path": ("model", "init_checkpoint"),
    }
    for rk, (sec, name) in mapping.items():
        if req.get(rk) is not None:
            d[sec][name] = req[rk]
    try:
        return config_from_dict(d, source=source)
    except ConfigError as e:
        # Name the request field rather than the internal key, since that is what the caller sent.
        msg = str(e)
        for rk, (sec, name) in mapping.items():
            msg = msg.replace(f"{sec}.{name}=", f"{rk}=")
        raise ConfigError(msg) from None


def load_training_request(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
                          base_config: str | None = None) -> Config:
    """Load the platform's TrainingRequest JSON file as a Config."""
    p = str(path)
    try:
        req = json.loads(read_text(p, "request file"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"request file {p!r}: invalid JSON ({e})") from None
    base = load_config(base_config) if base_config else None
    cfg = request_to_config(req, source=p, base=base)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg

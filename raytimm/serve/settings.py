"""The one typed source of Serve settings, their defaults and docs. No Ray imports.

- ``ServeArgs``: what the Serve app reads; ``build_app``'s annotated argument, so ``serve run`` and
  ``serve deploy`` (and a RayService's ``serveConfigV2``) validate their ``args`` against it.
- ``ServeSettings(ServeArgs)``: adds where ``raytimm serve`` listens; it is the ``serve:`` section of a
  raytimm config (``raytimm.config.Config.serve``) and what ``run_server`` takes.
- ``add_arguments`` / ``settings_from_cli``: ``raytimm serve``'s flags, generated from the fields;
  a flag the user gave overrides the config file's ``serve:`` section.

Errors name the key (``serve.max_batch_size=0 is out of range: expected >= 1``, or the flag).
"""
import argparse
import difflib
import ipaddress
import os
from typing import Any, Callable, ClassVar, Literal, Optional, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from raytimm.envvars import API_TOKEN_ENV
from raytimm.errors import ConfigError

APP_NAME = "raytimm"
QUIET_LOGGING = {"enable_access_log": False, "log_level": "WARNING"}
_CHECKPOINT_DOC = ("Checkpoint to serve: a checkpoint folder, a run or tune folder (its best), or a legacy .pt; "
                   "local, s3:// or r2://.")


class ServeArgs(BaseModel):
    """Arguments of ``build_app`` (``serve run raytimm.serve:build_app checkpoint=URI key=value ...``)."""

    model_config = ConfigDict(extra="forbid")
    # Read from the environment only: never a config key, a flag or a serve.yaml value (those are shown
    # by `serve status`, the dashboard and shell history).
    ENV_ONLY: ClassVar[dict] = {"api_token": API_TOKEN_ENV}

    checkpoint: str = Field(description=_CHECKPOINT_DOC)
    model_name: Optional[str] = Field(None, description="timm model name (legacy .pt checkpoints only).")
    num_classes: Optional[int] = Field(None, ge=1, description="Number of classes (legacy .pt checkpoints only).")
    replicas: int = Field(1, ge=1, description="Model replicas (ignored when autoscaling is set).")
    max_batch_size: int = Field(16, ge=1, description="Largest batch a model replica runs at once.")
    batch_wait_ms: float = Field(10.0, ge=0, description="How long a model replica waits to fill a batch, in ms.")
    max_upload_mb: float = Field(20.0, gt=0, description="Largest request body in MiB (413 above).")
    max_pixels: int = Field(40_000_000, gt=0, description="Largest image in pixels (413 above).")
    allow: list[str] = Field(default_factory=list, description="Storage prefixes /inference/quick may load "
                                                               "checkpoints from (a list, or 'a,b').")
    allow_checkpoint_root: bool = Field(True, description="Also allow the served checkpoint's storage root (its "
                                                          "bucket, or a local run folder's parent).")
    max_models: int = Field(4, ge=1, description="Checkpoints cached per model replica for /inference/quick (LRU).")
    backend: Literal["torch", "onnx"] = Field("torch", description="Inference backend of the model replicas: "
                                                                  "torch (eager PyTorch) or onnx (ONNX Runtime; a "
                                                                  "checkpoint is exported once per node, an export "
                                                                  "folder runs as is; needs raytimm[onnx]).")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per model replica (its torch or ONNX Runtime threads "
                                                   "follow them).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per model replica; a fraction shares a GPU.")
    ingress_num_cpus: float = Field(0.1, ge=0, description="CPUs per HTTP ingress replica (images decode there).")
    ingress_replicas: int = Field(1, ge=1, description="HTTP ingress replicas.")
    weights_dir: Optional[str] = Field(None, description="Folder of <model>.safetensors for pretrained "
                                                         "/inference/quick; default $RAYTIMM_WEIGHTS_DIR.")
    allow_models: list[str] = Field(default_factory=list, json_schema_extra={"metavar": "NAME"},
                                    description="timm models /inference/quick may load pretrained (no "
                                                "checkpoint_path); '*' = any timm model. Default: the models "
                                                "with weights in the weights folder plus the shipped targets "
                                                "(configs/train/).")
    max_model_params: int = Field(100_000_000, ge=1, description="Largest model a request may build "
                                                                 "(pretrained, or a legacy .pt's model_name), in "
                                                                 "parameters; counted without building it.")
    allow_hub: bool = Field(False, description="Let /inference/quick download pretrained weights from the "
                                               "Hugging Face hub when the weights folder has none (off: 404).")
    drain_timeout_s: float = Field(20.0, ge=0, description="On SIGTERM or Ctrl-C, how long requests already "
                                                           "accepted may take to finish; also Serve's "
                                                           "graceful_shutdown_timeout_s of each replica.")
    autoscaling: Optional[dict[str, Any]] = Field(None, description="Serve autoscaling_config of the model "
                                                                    "deployment, e.g. {min_replicas: 1, "
                                                                    "max_replicas: 4}; replaces replicas.")
    training_api: bool = Field(False, description="Turn on the training API (POST /training/start, GET /training, "
                                                  "GET /training/{id}, POST /training/{id}/stop): runs become Ray jobs "
                                                  "submitted through the cluster's Jobs API. Needs allow_data, and "
                                                  f"${API_TOKEN_ENV} unless the server binds to loopback.")
    runs_storage: str = Field("./runs", description="storage.path of every run the training API starts (local, made "
                                                    "absolute at start, or s3:// / r2://); also an allowed prefix for "
                                                    "/inference/quick, so a run's best_checkpoint can be served.")
    allow_data: list[str] = Field(default_factory=list, description="Storage prefixes a training request's "
                                                                    "dataset_path and checkpoint_path may name (a "
                                                                    "list, or 'a,b').")
    training_config: Optional[str] = Field(None, description="raytimm config YAML (path or bucket URI) with the "
                                                             "defaults of runs the training API starts (scaling, "
                                                             "mlflow, augmentation); the request's fields win.")
    ray_dashboard_url: Optional[str] = Field(None, description="Ray dashboard (Jobs API) the training API submits "
                                                               "to, e.g. http://127.0.0.1:8265; default: the one "
                                                               "the cluster records for itself.")
    api_token: Optional[SecretStr] = Field(None, exclude=True, description=f"Bearer token; default ${API_TOKEN_ENV} "
                                                                           "where the app is built.")

    @field_validator("allow", "allow_models", "allow_data", mode="before")
    @classmethod
    def _split_allow(cls, v):
        # `serve run ... allow=a,b` passes one string.
        if v is None:
            return []
        if isinstance(v, str):
            return [p for p in v.split(",") if p.strip()]
        return v

    def token(self) -> Optional[SecretStr]:
        """The API token: this field, else ${RAYTIMM_API_TOKEN} of this process; None when neither is set."""
        if self.api_token is not None and self.api_token.get_secret_value():
            return self.api_token
        value = os.environ.get(API_TOKEN_ENV)
        return SecretStr(value) if value else None


class ServeSettings(ServeArgs):
    """Everything ``raytimm serve`` takes: the app's arguments plus where the HTTP proxy listens."""

    checkpoint: Optional[str] = Field(None, description=_CHECKPOINT_DOC + " Required: in the config or as a flag.")
    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds; 0.0.0.0 exposes it to the network.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    metrics_export_port: Optional[int] = Field(
        None, ge=1, le=65535, description="Prometheus port of the local Ray that `raytimm serve` starts (Ray's "
                                          "and raytimm's metrics at /metrics); on a cluster (RAY_ADDRESS) the "
                                          "cluster's own export port serves them.")

    def app_args(self) -> ServeArgs:
        """The app's part (no host/port); ConfigError when no checkpoint is set."""
        if not self.checkpoint:
            raise ConfigError("no checkpoint to serve: give --checkpoint URI, or serve.checkpoint in the --config file")
        fields = set(ServeArgs.model_fields) - {"api_token"}
        return ServeArgs.model_validate({**self.model_dump(include=fields), "api_token": self.api_token})


DEFAULTS = ServeSettings()


def is_loopback(host: Optional[str]) -> bool:
    """Whether ``host`` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    if not host:
        return False
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def check_training_api(args: ServeArgs, *, host: Optional[str]) -> None:
    """Refuse a training API that anyone on the network could use, or one without data prefixes.

    ``host`` is where the HTTP proxy listens (None when unknown: then only a token will do).
    """
    if not args.training_api:
        return
    if not args.allow_data:
        raise ConfigError("the training API needs --allow-data PREFIX (serve.allow_data): the storage prefixes a "
                          "request's dataset_path and checkpoint_path may name")
    if args.token() is None and not is_loopback(host):
        where = f"binds to {host}" if host else "may be reachable from the network"
        raise ConfigError(f"the training API starts jobs on the cluster and the server {where}: set "
                          f"${API_TOKEN_ENV}, or bind to loopback (--host 127.0.0.1)")


# ----------------------------------------------------------------------------- errors naming the key

_TYPE_WORDS = {
    "int": "an integer", "float": "a number", "bool": "a boolean", "string": "a string", "list": "a list",
    "dict": "a mapping",
}


def _range_text(model: type, name: str) -> str:
    field = model.model_fields.get(name)
    bounds = {}
    for m in (field.metadata if field else ()):
        for kind in ("ge", "gt", "le", "lt"):
            if isinstance(m, getattr(annotated_types, kind.capitalize())):
                bounds[kind] = getattr(m, kind)
    if "ge" in bounds and "le" in bounds:
        return f"{bounds['ge']}..{bounds['le']}"
    ops = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return " and ".join(f"{ops[k]} {v}" for k, v in bounds.items()) or "a valid value"


def config_error(exc: ValidationError, model: type, key: Callable[[str], str], *, source: str = "") -> ConfigError:
    """One-line ConfigError for a pydantic error: the key (via ``key(field)``), the value, what is expected."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ())]
    name = loc[0] if loc else ""
    shown = key(name) + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc[1:])
    where = f"{source}: " if source else ""
    value, kind = err.get("input"), err.get("type", "")
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(name, list(model.model_fields), n=1, cutoff=0.5)
        hint = f" (did you mean {key(close[0])!r}?)" if close else ""
        return ConfigError(f"{where}unknown key {shown!r}{hint}")
    if kind == "missing":
        return ConfigError(f"{where}{shown} is required")
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return ConfigError(f"{where}{shown}={value!r} is out of range: expected {_range_text(model, name)}")
    base = kind.split("_")[0]
    if base in _TYPE_WORDS and (kind.endswith("_type") or kind.endswith("_parsing") or kind.startswith("int_from")):
        return ConfigError(f"{where}{shown}={value!r} has the wrong type: expected {_TYPE_WORDS[base]}")
    return ConfigError(f"{where}{shown}={value!r} is invalid: {err.get('msg', 'bad value')}")


def validate_section(data: Any, model: type, prefix: str, *, source: str) -> BaseModel:
    """A config file's section as ``model``: unknown or environment-only keys and bad values name ``prefix.key``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: section {prefix!r} must be a mapping, got {data!r}")
    for name in data:
        if name in model.ENV_ONLY:
            raise ConfigError(f"{source}: {prefix}.{name} cannot be set in a config (configs are logged and "
                              f"shown): set ${model.ENV_ONLY[name]} in the environment instead")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise config_error(e, model, lambda n: f"{prefix}.{n}", source=source) from None


def section_docs(model: type) -> dict:
    """Field -> one-line doc for the keys a config file may set (environment-only fields left out)."""
    return {n: f.description or "" for n, f in model.model_fields.items() if n not in model.ENV_ONLY}


# ----------------------------------------------------------------------------- `raytimm serve` flags

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _plain_type(annotation: Any) -> Any:
    """``Optional[X]`` -> X; ``list[str]`` -> list; ``dict[...]`` -> dict."""
    if get_origin(annotation) is Union:
        args = [a for a in get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else str
    return get_origin(annotation) or annotation


def _mapping(text: str) -> dict:
    import yaml
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping such as '{{min_replicas: 1, max_replicas: 4}}', "
                                         f"got {text[:60]!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser, model: type = ServeSettings) -> None:
    """One flag per setting (``max_batch_size`` -> ``--max-batch-size``); unset flags stay out of the namespace."""
    for name, field in model.model_fields.items():
        if name in model.ENV_ONLY:
            continue
        tp = _plain_type(field.annotation)
        choices = get_args(field.annotation) if tp is Literal else None
        default = field.get_default(call_default_factory=True)
        shown = "none" if default is None else default
        doc = (field.description or "").replace("%", "%%")
        kw: dict = dict(dest=name, default=argparse.SUPPRESS, help=f"{doc} (default {shown})")
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif tp is list:
            kw.update(action="append", metavar=(field.json_schema_extra or {}).get("metavar", "PREFIX"))
            kw["help"] = doc + " Repeatable."
        elif tp is dict:
            kw.update(type=_mapping, metavar="YAML")
        elif choices:
            kw.update(type=str, choices=list(choices))
        else:
            kw.update(type=tp if tp in (int, float) else str, metavar=name.upper())
        parser.add_argument(_flag(name), **kw)


def given_flags(namespace: argparse.Namespace, model: type = ServeSettings) -> dict:
    """The settings flags the user actually gave (``add_arguments`` leaves the others out)."""
    return {k: v for k, v in vars(namespace).items() if k in model.model_fields and k not in model.ENV_ONLY}


def settings_from_cli(config_path: Optional[str], flags: dict) -> ServeSettings:
    """The ``serve:`` section of a raytimm config file (defaults without one), then the given flags over it."""
    from raytimm.config import load_config  # the config imports this module: load it lazily

    base = load_config(config_path).serve if config_path else ServeSettings()
    try:
        # model_dump leaves api_token out: it comes from the environment, never a file or flag.
        return ServeSettings.model_validate({**base.model_dump(), **flags})
    except ValidationError as e:
        raise config_error(e, ServeSettings, lambda n: _flag(n) if n in flags else f"serve.{n}") from None

"""The Serve application: ``build_app`` (the typed builder ``serve run``/``serve deploy`` import) and ``deploy``.

No ``from __future__ import annotations`` here: Serve inspects ``build_app``'s annotation as a real
class to validate its arguments.
"""
import hashlib
import os
from typing import Any

from ray import serve

import raytimm
from raytimm.envvars import WEIGHTS_DIR_ENV, forwarded_env
from raytimm.errors import ConfigError
from raytimm.serve.ingress import Ingress
from raytimm.serve.model import ModelServer
from raytimm.serve.paths import normalize_prefix, storage_root
from raytimm.serve.settings import APP_NAME, QUIET_LOGGING, ServeArgs, check_training_api

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_RAYTIMM_DIR = os.path.dirname(_PACKAGE_DIR)
# What replicas run: a change to any of these must restart them (a new deployment version).
_VERSIONED_MODULES = ("predict.py", "export.py", "checkpoint.py", "model.py")


def versioned_sources() -> list:
    """Source files whose bytes make up the deployment version: this package and what replicas load."""
    package = sorted(os.path.join(_PACKAGE_DIR, n) for n in os.listdir(_PACKAGE_DIR) if n.endswith(".py"))
    return package + [os.path.join(_RAYTIMM_DIR, n) for n in _VERSIONED_MODULES]


def code_version(*parts: Any) -> str:
    """A deployment version that stays the same across redeploys of the same code and init arguments.

    serve.run gives every deployment a random version, so each redeploy restarts replicas. With a
    stable version, a redeploy that changes only user_config (the checkpoint) calls reconfigure()
    on the running replicas instead: the in-place hot reload. (`serve deploy` computes its own.)
    """
    h = hashlib.sha256(raytimm.__version__.encode())
    for path in versioned_sources():
        try:
            with open(path, "rb") as f:
                h.update(f.read())
        except OSError:
            pass
    for part in parts:
        h.update(repr(part).encode())
    return h.hexdigest()[:16]


def _with_version(deployment, version: str):
    try:
        return deployment.options(version=version, _internal=True)
    except (TypeError, ValueError):  # Serve API moved: redeploys then restart replicas (still no failed requests)
        return deployment


def model_options(args: ServeArgs) -> dict:
    """ModelServer's deployment options for these args (without runtime_env): what configs/serve.yaml spells out."""
    opts: dict = dict(
        max_ongoing_requests=max(32, 4 * args.max_batch_size),
        graceful_shutdown_timeout_s=args.drain_timeout_s,
        ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
        user_config={"checkpoint": args.checkpoint, "model_name": args.model_name,
                     "num_classes": args.num_classes, "max_batch_size": args.max_batch_size,
                     "batch_wait_ms": args.batch_wait_ms, "max_pixels": args.max_pixels},
    )
    if args.autoscaling:
        opts["autoscaling_config"] = args.autoscaling
    else:
        opts["num_replicas"] = args.replicas
    return opts


def ingress_options(args: ServeArgs) -> dict:
    """Ingress's deployment options for these args (without runtime_env and user_config)."""
    return dict(num_replicas=args.ingress_replicas, max_ongoing_requests=256,
                graceful_shutdown_timeout_s=args.drain_timeout_s,
                ray_actor_options={"num_cpus": args.ingress_num_cpus})


def _with_env(options: dict, env: dict) -> dict:
    return {**options, "ray_actor_options": {**options["ray_actor_options"], "runtime_env": {"env_vars": env}}}


def proxy_host():
    """Where Serve's HTTP proxy listens, from the running Serve controller; None when it cannot be told."""
    try:
        from ray.serve.context import _get_global_client
        return _get_global_client().http_config.host
    except Exception:  # noqa: BLE001 - no controller yet, or the API moved: treated as "not loopback"
        return None


def training_api_options(args: ServeArgs):
    """TrainingService's arguments for the ingress (None when the training API is off); refuses an exposed one."""
    if not args.training_api:
        return None
    from raytimm import storage
    from raytimm.config import config_to_dict, load_config

    check_training_api(args, host=proxy_host())
    base = config_to_dict(load_config(args.training_config)) if args.training_config else None
    # Local runs storage is made absolute here, where the server starts (replicas have another cwd).
    return {"runs_storage": storage.normalize(args.runs_storage), "allow_data": list(args.allow_data),
            "base_config": base, "dashboard_url": args.ray_dashboard_url}


def check_backend_installed(args: ServeArgs) -> None:
    """The onnx backend without onnxruntime: one line naming the extra, before anything starts."""
    if args.backend == "onnx":
        from raytimm.export import import_onnxruntime
        import_onnxruntime()


def build_app(args: ServeArgs):
    """Typed Serve app builder: Ingress(FastAPI) bound to a ModelServer loaded from ``args.checkpoint``."""
    from raytimm import checkpoint as ckpt

    if not args.checkpoint:  # a ServeSettings without one (ServeArgs itself requires it)
        raise ConfigError("no checkpoint to serve: set checkpoint")
    check_backend_installed(args)
    # Fail here, with the URI in the message, rather than in a replica's log.
    resolved = ckpt.resolve_checkpoint(args.checkpoint)
    allow = [normalize_prefix(p) for p in args.allow]
    if args.allow_checkpoint_root:
        allow.append(normalize_prefix(storage_root(resolved)))
    training_api = training_api_options(args)
    if training_api:  # a run's best_checkpoint, as GET /training/{id} reports it, can be served as it is
        allow.append(normalize_prefix(training_api["runs_storage"]))
    weights_dir = args.weights_dir or os.environ.get(WEIGHTS_DIR_ENV)
    env = forwarded_env()
    if weights_dir:
        env[WEIGHTS_DIR_ENV] = weights_dir
    # Torch / ONNX Runtime threads come from the CPUs Ray assigns each replica (also when serve.yaml overrides
    # them). The backend is an init argument: changing it restarts the replicas (a new version), not a reload.
    model_kwargs = dict(weights_dir=weights_dir, max_models=args.max_models, allow_hub=args.allow_hub,
                        backend=args.backend)
    model = ModelServer.options(**_with_env(model_options(args), env))
    model = _with_version(model, code_version("model", model_kwargs)).bind(**model_kwargs)
    token = args.token()
    # Only a hash of the token enters the version (so a new token restarts the ingress); never the token.
    token_hash = hashlib.sha256(token.get_secret_value().encode()).hexdigest() if token else None
    ingress = _with_version(Ingress, code_version("ingress", token_hash, training_api))
    ingress = ingress.options(**_with_env(ingress_options(args), env),
                              user_config={"allow": allow, "max_upload_mb": args.max_upload_mb,
                                           "max_pixels": args.max_pixels, "allow_models": args.allow_models,
                                           "max_model_params": args.max_model_params})
    return ingress.bind(model, token, training_api)


def deploy(args: ServeArgs, *, blocking: bool = False):
    """serve.run the app under the raytimm name at route '/' (re-running with a new checkpoint hot-reloads)."""
    return serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=blocking,
                     logging_config=QUIET_LOGGING)

"""Ray Serve application: FastAPI ingress + batched, multiplexed model deployment.

    raytimm serve --checkpoint URI [--config FILE]      # server.run_server(): local Ray (or RAY_ADDRESS), blocks
    serve run raytimm.serve:build_app checkpoint=URI    # typed app builder (settings.ServeArgs)
    serve deploy configs/serve.yaml                     # same builder; the file is written by deploy_config.py

One module per job:
  settings.py  the typed settings, flags (no Ray)   http.py     client errors, form fields (no Ray)
  paths.py     allowed checkpoint prefixes (no Ray) model.py    ModelServer: hot reload, multiplexing, batching
  ingress.py   FastAPI app + Ingress deployment     app.py      build_app, deploy, deployment version
  server.py    `raytimm serve`: start, wait, block  deploy_config.py  serve deploy YAML from the settings

Only this package imports ``ray.serve``. The names below are loaded on first use, so importing
``raytimm.serve.settings`` (the config does) or ``raytimm.serve.http`` does not import Ray.
"""
import importlib

_LAZY = {
    "build_app": "raytimm.serve.app", "deploy": "raytimm.serve.app",
    "ServeArgs": "raytimm.serve.settings", "ServeSettings": "raytimm.serve.settings",
    "ModelServer": "raytimm.serve.model", "Ingress": "raytimm.serve.ingress",
    "run_server": "raytimm.serve.server", "shutdown_server": "raytimm.serve.server",
    "wait_healthy": "raytimm.serve.server",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    # `serve run raytimm.serve:build_app` resolves the builder with getattr on this package.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'raytimm.serve' has no attribute {name!r}")

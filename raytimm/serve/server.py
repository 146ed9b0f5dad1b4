"""``raytimm serve``: start Ray and Serve, deploy, wait until healthy, block, shut down."""
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from typing import Optional

from ray import serve

from raytimm.errors import RaytimmError
from raytimm.serve.app import deploy
from raytimm.serve.settings import QUIET_LOGGING, ServeArgs, ServeSettings, check_training_api

log = logging.getLogger("raytimm.serve")

def wait_healthy(url: str, timeout_s: float = 300.0) -> None:
    """Poll GET /healthz until 200; raise RaytimmError with the last answer after timeout_s."""
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/healthz", timeout=5) as r:
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except OSError as e:
            last = type(e).__name__
        time.sleep(0.5)
    raise RaytimmError(f"{url}/healthz did not become ready within {timeout_s:.0f}s (last: {last})")


def start_serve(host: str, port: int, metrics_export_port: Optional[int] = None, *,
                include_dashboard: bool = False) -> bool:
    """ray.init (local, or the cluster at RAY_ADDRESS) and serve.start on host:port; True if we started Ray.

    ``metrics_export_port`` is the local Ray's Prometheus port; a cluster keeps its own.
    ``include_dashboard``: a local Ray gets its dashboard (the Jobs API the training API submits to).
    """
    import ray

    from raytimm.logs import quiet_third_party
    quiet_third_party()
    started = False
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            if metrics_export_port:
                log.warning("--metrics-export-port %d ignored: joining the cluster at RAY_ADDRESS, whose own "
                            "metrics export port serves raytimm's metrics", metrics_export_port)
            ray.init(address="auto", logging_level=logging.WARNING, log_to_driver=False)
        else:
            ray.init(include_dashboard=include_dashboard, logging_level=logging.WARNING, log_to_driver=True,
                     _metrics_export_port=metrics_export_port)
            started = True
    serve.start(http_options={"host": host, "port": int(port)}, logging_config=QUIET_LOGGING)
    return started


def run_server(settings: ServeSettings, *, block: bool = True, ready_timeout_s: float = 600.0) -> str:
    """`raytimm serve`: start Serve, deploy, print the URL when /healthz is ready, block until Ctrl-C.

    SIGHUP re-resolves the checkpoint (e.g. a run folder's new `best`) and hot-reloads it.
    Returns the URL (when block=False the app keeps running; call shutdown_server()).
    """
    args = settings.app_args()
    from raytimm import checkpoint as ckpt
    ckpt.resolve_checkpoint(args.checkpoint)  # before starting Ray: a typo fails in a second, not a minute
    host, port = settings.host, settings.port
    check_training_api(args, host=host)
    started = start_serve(host, port, settings.metrics_export_port, include_dashboard=args.training_api)
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown_host}:{port}"
    try:
        deploy(args)
        wait_healthy(url, timeout_s=ready_timeout_s)
        print(f"raytimm serving {args.checkpoint} at {url}  (POST /predict, POST /inference/quick, GET /model)",
              flush=True)
        if not block:
            return url
        _block_until_interrupt(args)
    except BaseException:
        shutdown_server(stop_ray=started)
        raise
    shutdown_server(stop_ray=started)
    return url


def _block_until_interrupt(args: ServeArgs) -> None:
    """Sleep until Ctrl-C/SIGTERM; SIGHUP redeploys (hot reload of the checkpoint's current best)."""
    stop = threading.Event()
    reload_requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda *_: reload_requested.set())
    try:
        while not stop.is_set():
            time.sleep(0.5)
            if reload_requested.is_set():
                reload_requested.clear()
                args = _with_resolved(args)
                print(f"reloading {args.checkpoint}", flush=True)
                deploy(args)
    except KeyboardInterrupt:
        pass
    print("shutting down", flush=True)


def _with_resolved(args: ServeArgs) -> ServeArgs:
    """Pin the concrete checkpoint so a changed `best` pointer yields a new user_config (hot reload)."""
    from raytimm import checkpoint as ckpt
    return args.model_copy(update={"checkpoint": ckpt.resolve_checkpoint(args.checkpoint).uri})


def shutdown_server(stop_ray: bool = True) -> None:
    """serve.shutdown(), and ray.shutdown() when this process started Ray."""
    import ray
    try:
        serve.shutdown()
    except Exception as exc:  # noqa: BLE001 - shutting down anyway
        log.warning("serve.shutdown failed: %s", exc)
    if stop_ray and ray.is_initialized():
        ray.shutdown()

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
from raytimm.serve.app import check_backend_installed, deploy
from raytimm.serve.capacity import shortfalls
from raytimm.serve.settings import APP_NAME, QUIET_LOGGING, ServeArgs, ServeSettings, check_training_api

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


class _ShutdownRequested(BaseException):
    """Raised in the main thread by SIGTERM (as KeyboardInterrupt is by Ctrl-C); not an error: exit 0."""


# Set by SIGTERM. The exception the handler raises can surface as something else: raised while C code
# (Ray's Cython, pydantic) runs, Python reports it as a SystemError "returned a result with an exception set".
_TERMINATING = threading.Event()


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one shutdown; a second SIGTERM must not cut the drain
    _TERMINATING.set()
    raise _ShutdownRequested()


def _init_ray(metrics_export_port: Optional[int] = None, include_dashboard: bool = False) -> bool:
    """ray.init: the cluster at RAY_ADDRESS, else a new local Ray of this process; True if we started it.

    ``metrics_export_port`` is the local Ray's Prometheus port; a cluster keeps its own.

    address="local" always starts our own: without it ray.init joins any Ray already running on the
    machine (another user's `ray start`), which a later ray.shutdown() would not stop and whose size
    is not ours to judge. ray.init replaces the SIGTERM handling (Ray's core worker installs a native
    handler that prints a "SIGTERM received ... logging.cc" stack dump and aborts), so the handler this
    process had is put back right after it.
    """
    import ray

    handler = signal.getsignal(signal.SIGTERM)
    try:
        if os.environ.get("RAY_ADDRESS"):
            if metrics_export_port:
                log.warning("--metrics-export-port %d ignored: joining the cluster at RAY_ADDRESS, whose own "
                            "metrics export port serves raytimm's metrics", metrics_export_port)
            ray.init(address="auto", logging_level=logging.WARNING, log_to_driver=False)
            return False
        try:
            ray.init(address="local", include_dashboard=include_dashboard, logging_level=logging.WARNING, log_to_driver=True,
                     _metrics_export_port=metrics_export_port)
        except BaseException:
            ray.shutdown()  # a half-started local Ray (SIGTERM or an error while it starts) leaves no processes
            raise
        return True
    except SystemExit as exc:
        # ray.init's own SIGTERM handler (set while it connects) exits with the signal number.
        if exc.code == signal.SIGTERM and handler is _on_sigterm:
            _TERMINATING.set()
            raise _ShutdownRequested() from None
        raise
    finally:
        if threading.current_thread() is threading.main_thread() and handler is not None:
            signal.signal(signal.SIGTERM, handler)


def start_serve(host: str, port: int, metrics_export_port: Optional[int] = None, *,
                include_dashboard: bool = False) -> bool:
    """ray.init (a new local Ray, or RAY_ADDRESS's cluster) and serve.start on host:port; True if we started Ray.

    ``metrics_export_port`` is the local Ray's Prometheus port; a cluster keeps its own.
    ``include_dashboard``: a local Ray gets its dashboard (the Jobs API the training API submits to).
    """
    import ray

    from raytimm.logs import quiet_third_party
    quiet_third_party()
    started = False
    if not ray.is_initialized():
        started = _init_ray(metrics_export_port, include_dashboard)
    serve.start(http_options={"host": host, "port": int(port)}, logging_config=QUIET_LOGGING)
    return started


def check_capacity(args: ServeArgs, *, local: bool) -> None:
    """Fail at once (local Ray) or warn once (joined cluster) when the replicas can never all be placed."""
    import ray

    errors, warnings = shortfalls(args, ray.cluster_resources(), local=local)
    for w in warnings:
        log.warning("%s", w)
    if errors:
        raise RaytimmError("; ".join(errors))


def run_server(settings: ServeSettings, *, block: bool = True, ready_timeout_s: float = 600.0) -> str:
    """`raytimm serve`: start Serve, deploy, print the URL when /healthz is ready, block until Ctrl-C/SIGTERM.

    SIGTERM (Kubernetes, systemd) and Ctrl-C shut down the same way: new requests get 503, those already
    accepted finish (up to drain_timeout_s), then Serve and the Ray we started stop; SIGTERM returns
    normally (exit 0). SIGHUP re-resolves the checkpoint (e.g. a run folder's new `best`) and hot-reloads it.
    Returns the URL (when block=False the app keeps running; call shutdown_server()).
    """
    args = settings.app_args()
    from raytimm import checkpoint as ckpt
    ckpt.resolve_checkpoint(args.checkpoint)  # before starting Ray: a typo fails in a second, not a minute
    check_backend_installed(args)  # likewise a missing raytimm[onnx]
    host, port = settings.host, settings.port
    check_training_api(args, host=host)  # before Ray starts: the training API's own settings
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    main_thread = threading.current_thread() is threading.main_thread()
    _TERMINATING.clear()
    # From here on SIGTERM unwinds like Ctrl-C (start_serve keeps it so across ray.init).
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    started = False
    try:
        try:
            import ray
            started = False if ray.is_initialized() else _init_ray(settings.metrics_export_port,
                                                                       include_dashboard=args.training_api)
            check_capacity(args, local=started)  # before Serve starts: a shortfall fails in seconds
            start_serve(host, port)
            deploy(args)
            wait_healthy(url, timeout_s=ready_timeout_s)
            print(f"raytimm serving {args.checkpoint} at {url}  (POST /predict, POST /inference/quick, "
                  f"GET /model)", flush=True)
            if not block:
                return url
            try:
                _block_until_interrupt(args)
            finally:
                print(f"shutting down: finishing requests in flight (up to {args.drain_timeout_s:g}s)", flush=True)
                drain_ingress(args.drain_timeout_s, args.ingress_replicas)
        except BaseException:
            if not _TERMINATING.is_set():
                shutdown_server(stop_ray=started)
                raise
            print("shutting down (SIGTERM)", flush=True)  # during start-up, or the drain: not an error
        shutdown_server(stop_ray=started)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    return url


def _block_until_interrupt(args: ServeArgs) -> None:
    """Sleep until Ctrl-C/SIGTERM; SIGHUP redeploys (hot reload of the checkpoint's current best)."""
    reload_requested = threading.Event()
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda *_: reload_requested.set())
    try:
        while True:
            time.sleep(0.5)
            if reload_requested.is_set():
                reload_requested.clear()
                args = _with_resolved(args)
                print(f"reloading {args.checkpoint}", flush=True)
                deploy(args)
    except (KeyboardInterrupt, _ShutdownRequested):
        pass


def drain_ingress(timeout_s: float, replicas: int) -> int:
    """Have each Ingress replica refuse new requests and wait (up to timeout_s) for those in flight.

    serve.shutdown() alone kills the HTTP proxy and all replicas at once, cutting requests mid-way.
    A handle call reaches one replica, picked by Serve; calls repeat until every replica has answered
    (a drained replica answers at once). Returns the requests still in flight at the end.
    """
    from raytimm.serve.ingress import Ingress

    deadline = time.monotonic() + max(0.0, timeout_s)
    seen: dict = {}
    try:
        handle = serve.get_deployment_handle(Ingress.name, APP_NAME)
        while len(seen) < replicas:
            left = max(0.0, deadline - time.monotonic())
            calls = [handle.drain.remote(left) for _ in range(replicas - len(seen))]
            for call in calls:
                out = call.result(timeout_s=left + 10)
                seen[out["replica"]] = out["inflight"]
            if time.monotonic() >= deadline:
                break
    except Exception as exc:  # noqa: BLE001 - shutting down anyway; the replicas' own graceful shutdown remains
        log.warning("could not drain the HTTP ingress: %s: %s", type(exc).__name__, exc)
    left_over = sum(seen.values())
    if left_over:
        log.warning("%d request(s) still running after %gs; shutting down anyway", left_over, timeout_s)
    return left_over


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

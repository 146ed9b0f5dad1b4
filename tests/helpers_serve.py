"""`raytimm serve` as a subprocess for end-to-end tests: started, waited for, and stopped with Ctrl-C."""
from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

BIN = Path(sys.executable).parent


@contextlib.contextmanager
def raytimm_serve(args: list[str], *, port: int, cwd, env: Optional[dict] = None,
                  ready_timeout_s: float = 300.0, stop_timeout_s: float = 120.0) -> Iterator[subprocess.Popen]:
    """Run `raytimm serve ARGS --port PORT` until it prints its URL; Ctrl-C it afterwards.

    ``env``: the whole environment (default: this process's). Its output is read all along (a full
    pipe would block the server) and its last lines are shown when it fails. The command shuts Serve
    (and the Ray it started, if any) down itself on SIGINT.
    """
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([str(BIN / "raytimm"), "serve", *args, "--port", str(port)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: collections.deque = collections.deque(maxlen=80)
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if f"127.0.0.1:{port}" in line and "serving" in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + ready_timeout_s
        while not ready.wait(1.0):
            assert proc.poll() is None, "raytimm serve exited:\n" + "".join(lines)
            assert time.monotonic() < deadline, "raytimm serve did not become ready:\n" + "".join(lines)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=stop_timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        reader.join(timeout=10)
    assert proc.returncode in (0, -signal.SIGINT, 130), f"exit {proc.returncode}:\n" + "".join(lines)


@contextlib.contextmanager
def local_serve(*, env: Optional[dict] = None, **ray_kwargs) -> Iterator[str]:
    """A local Ray + Serve on a free loopback port for a test module; yields the base URL.

    ``env`` is set before Ray starts (its workers and replicas inherit it) and restored afterwards;
    ``ray_kwargs`` override ``ray.init``'s (2 CPUs, no dashboard, quiet). Serve and Ray are shut down
    at the end, also when the body fails.
    """
    import pytest
    import ray
    from ray import serve

    from raytimm.serve.server import shutdown_server
    from tests.helpers_net import free_port

    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in (env or {}).items():
            mp.setenv(name, value)
        ray.init(**{"num_cpus": 2, "include_dashboard": False, "logging_level": "WARNING", **ray_kwargs})
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            yield f"http://127.0.0.1:{port}"
        finally:
            shutdown_server(stop_ray=True)


def bearer_session(token: str):
    """A requests.Session that sends ``Authorization: Bearer <token>``."""
    import requests

    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    return session

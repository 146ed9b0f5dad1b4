"""A throwaway Ray head for tests and benchmarks that need a real cluster (tests/test_tune.py,
benchmarks/tune_asha.py).

`ray start --head --block` on loopback, in its own session, with RAY_ADDRESS in its environment:
Train's placement-group cleaner (State API) then finds *this* cluster even when other Ray
instances run on the machine; a plain local `ray.init()` cannot tell them apart and leaks
stopped trials' CPUs. It is stopped by the pids of its session, never with `ray stop` (which
would stop every Ray on the machine).
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

from tests.helpers_net import free_port

BIN = Path(sys.executable).parent


def session_pids(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    return [int(p) for p, s in (line.split() for line in out.splitlines()) if int(s) == sid]


def stop_session(sid: int) -> None:
    """Stop every process of the session we started (the head and its workers), by pid."""
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in session_pids(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.5)


def _head_command(num_cpus: int, temp: Path, unset_env: Iterable[str] = ()) -> tuple[str, str, dict, list[str]]:
    """(GCS address, dashboard URL, environment, `ray start --head --block ...`) on free loopback ports;
    the environment is this process's without the ``unset_env`` variables."""
    gcs, dashboard = free_port(), free_port()
    address = f"127.0.0.1:{gcs}"
    env = {k: v for k, v in os.environ.items() if k not in set(unset_env)}
    env.update(RAY_ADDRESS=address, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
           "--num-cpus", str(num_cpus), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(dashboard), "--ray-client-server-port", str(free_port()),
           "--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats", "--temp-dir", str(temp)]
    return address, f"http://127.0.0.1:{dashboard}", env, cmd


@contextlib.contextmanager
def ray_head_process(num_cpus: int, temp_dir: str | os.PathLike,
                     ready_timeout_s: float = 180.0) -> Iterator[tuple[str, str, dict]]:
    """A Ray head like ``ray_head``, but this process stays out of it (no ``ray.init`` here: its
    RAY_AUTH_MODE would be fixed at import). Yields (GCS address, dashboard URL, env for clients)
    once its Jobs API answers `ray job list`."""
    temp = Path(temp_dir)
    address, dashboard, env, cmd = _head_command(num_cpus, temp)
    log = open(temp / "head.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            assert proc.poll() is None, (temp / "head.log").read_text()[-3000:]
            r = subprocess.run([str(BIN / "ray"), "job", "list", "--address", dashboard], env=env,
                               capture_output=True, text=True, timeout=120)
            if r.returncode == 0:
                break
            assert time.monotonic() < deadline, r.stdout[-2000:] + r.stderr[-2000:]
            time.sleep(2)
        yield address, dashboard, env
    finally:
        stop_session(proc.pid)
        log.close()


@contextlib.contextmanager
def ray_head(num_cpus: int, temp_dir: str | os.PathLike, connect_timeout_s: float = 120.0,
             unset_env: Iterable[str] = ()) -> Iterator[str]:
    """A Ray head on 127.0.0.1 with the dashboard; yields its GCS address with this process connected.

    RAY_ADDRESS and RAY_AUTH_MODE=token are set in os.environ while it runs (restored after).
    ``unset_env`` names variables the head (and so its workers) must not inherit from this process,
    as on a cluster started elsewhere.
    """
    temp = Path(temp_dir)
    address, _, env, cmd = _head_command(num_cpus, temp, unset_env=unset_env)
    log = open(temp / "head.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    os.environ.update(RAY_ADDRESS=address, RAY_AUTH_MODE="token")
    if "ray" in sys.modules:
        # Ray reads RAY_AUTH_MODE into its config when it is imported; one imported earlier in this
        # process without it would connect without the token ("InvalidAuthToken"). Reread it.
        from ray._private.authentication_test_utils import reset_auth_token_state

        reset_auth_token_state()
    try:
        import ray

        deadline = time.monotonic() + connect_timeout_s
        while True:
            assert proc.poll() is None, (temp / "head.log").read_text()[-3000:]
            try:
                ray.init(address=address, logging_level="ERROR")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)
        yield address
    finally:
        with contextlib.suppress(Exception):
            import ray

            ray.shutdown()
        stop_session(proc.pid)
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def wait_cpus_free(total: float, timeout_s: float = 60.0) -> float:
    """Wait until ``total`` CPUs are free (an earlier sweep's trials are gone); the CPUs free at the end."""
    import ray

    deadline = time.monotonic() + timeout_s
    free = ray.available_resources().get("CPU", 0.0)
    while free < total and time.monotonic() < deadline:
        time.sleep(1.0)
        free = ray.available_resources().get("CPU", 0.0)
    return free

"""`raytimm serve` started and stopped as a user (or Kubernetes, or systemd) would: a real subprocess each.

- replicas that can never fit a local Ray fail before deploying, with one line naming the flags;
- SIGTERM while a request is in flight: the request completes (200), new ones get 503, the process
  exits 0 without Ray's native stack dump, and no process of its session is left.
"""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.helpers_net import free_port
from tests.helpers_ray import session_pids, stop_session
from tests.test_predict import CLASSES, color_image, make_trained_checkpoint, png_bytes

pytestmark = [pytest.mark.serve, pytest.mark.ray, pytest.mark.e2e]

BIN = Path(sys.executable).parent
NATIVE_DUMP = ("logging.cc", "SIGTERM received", "*** SIGTERM", "Traceback")


def _env() -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    for key in ("RAY_ADDRESS", "RAYTIMM_API_TOKEN"):
        env.pop(key, None)  # a local Ray of its own, no token
    return env


def _serve(checkpoint: str, port: int, *flags: str) -> subprocess.Popen:
    cmd = [str(BIN / "raytimm"), "serve", "--checkpoint", checkpoint, "--port", str(port), *flags]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _assert_session_gone(sid: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = session_pids(sid)
    if left:
        stop_session(sid)
    assert not left, f"processes of the server's session left behind: {left}"


def _session_runs(sid: int, title: str) -> bool:
    """Whether a process of the session has ``title`` in its command line (Ray sets actors' process titles)."""
    for pid in session_pids(sid):
        try:
            if title in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                return True
        except OSError:
            continue
    return False


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    run = tmp_path_factory.mktemp("lifecycle") / "runs" / "run1"
    make_trained_checkpoint(run, steps=1)  # what it predicts does not matter here
    return str(run)


def test_replicas_that_can_never_fit_fail_before_deploying(checkpoint):
    replicas = (os.cpu_count() or 2) + 1  # 3 on a 2-core machine: more than a local Ray has CPUs
    proc = _serve(checkpoint, free_port(), "--replicas", str(replicas))
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            stop_session(proc.pid)
    assert proc.returncode == 2, (proc.returncode, out, err)
    assert "serving" not in out
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert f"--replicas {replicas}" in line and "--num-cpus 1" in line and "CPUs" in line, line
    assert "this machine's Ray has" in line and "lower --replicas or --num-cpus" in line, line
    _assert_session_gone(proc.pid)


def test_sigterm_finishes_the_request_in_flight_and_exits_0(checkpoint):
    port = free_port()
    proc = _serve(checkpoint, port, "--num-cpus", "0.5", "--drain-timeout-s", "60")
    url = f"http://127.0.0.1:{port}"
    stdout_lines: list = []
    stderr_lines: list = []
    # Read stderr all along: Ray forwards replica logs there, and a full pipe would stall the server.
    threading.Thread(target=lambda: stderr_lines.extend(proc.stderr), daemon=True).start()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            stdout_lines.append(line)
            if "serving" in line and url in line:
                break
        assert proc.poll() is None and "serving" in "".join(stdout_lines), "".join(stdout_lines + stderr_lines)
        reader = threading.Thread(target=lambda: stdout_lines.extend(proc.stdout), daemon=True)
        reader.start()

        # A request whose body arrives in two parts: the second is sent only after SIGTERM, so the
        # request is certainly in flight (accepted, inside the route) while the server shuts down.
        boundary = "lifecycle-boundary"
        parts = [(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{i}.png\"\r\n"
                  f"Content-Type: image/png\r\n\r\n").encode() + png_bytes(color_image("red", seed=i)) + b"\r\n"
                 for i in range(6)]
        head_sent, release = threading.Event(), threading.Event()

        def body():
            yield b"".join(parts[:3])
            head_sent.set()
            release.wait(120)
            yield b"".join(parts[3:]) + f"--{boundary}--\r\n".encode()

        answer: dict = {}

        def post():
            try:
                answer["r"] = requests.post(url + "/predict", data=body(), timeout=180,
                                            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
            except requests.RequestException as exc:
                answer["error"] = repr(exc)

        client = threading.Thread(target=post)
        client.start()
        assert head_sent.wait(60)
        time.sleep(3)  # the proxy hands the request to the ingress (a local hop) before SIGTERM arrives
        os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while not any("finishing requests in flight" in x for x in stdout_lines):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(stdout_lines)
            time.sleep(0.2)
        # While it drains: new requests are refused with 503 (a load balancer retries elsewhere).
        r = requests.post(url + "/predict", files=[("file", ("n.png", png_bytes(color_image("red")), "image/png"))],
                          timeout=60)
        assert r.status_code == 503 and "shutting down" in r.json()["detail"], r.text
        assert requests.get(url + "/healthz", timeout=60).status_code == 503
        release.set()
        client.join(180)
        assert "error" not in answer, answer
        assert answer["r"].status_code == 200, answer["r"].text
        results = answer["r"].json()["results"]
        assert len(results) == 6 and all(x["predicted_class"] in CLASSES for x in results)
        rc = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            stop_session(proc.pid)
    time.sleep(1)  # the reader thread drains what is left in the pipe
    err = "".join(stderr_lines)
    assert rc == 0, (rc, "".join(stdout_lines), err)
    for marker in NATIVE_DUMP:
        assert marker not in err, err[-3000:]
    _assert_session_gone(proc.pid)


def test_sigterm_while_starting_exits_0_without_a_stack_dump(checkpoint):
    """Where the issue saw Ray's native "SIGTERM received ... logging.cc" dump: SIGTERM once Ray is up (Serve's
    controller runs), before the app serves; Ray's core worker had replaced the driver's SIGTERM handler."""
    proc = _serve(checkpoint, free_port(), "--num-cpus", "0.5")
    lines: list = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    try:
        deadline = time.monotonic() + 300
        while not _session_runs(proc.pid, "ServeController") and proc.poll() is None:  # ray.init has returned
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=180)
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            stop_session(proc.pid)
    time.sleep(1)
    err = "".join(lines)
    assert rc == 0, (rc, out, err)
    assert "shutting down" in out, out
    for marker in NATIVE_DUMP:
        assert marker not in err, err[-3000:]
    _assert_session_gone(proc.pid)

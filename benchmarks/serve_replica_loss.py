"""Replica loss under load: SIGKILL one of 2 model replicas while closed-loop traffic runs.

    python benchmarks/serve_replica_loss.py                 # resnet18 @ 224 px, concurrency 8
    python benchmarks/serve_replica_loss.py --before 10 --after 30

Serve runs in this process (``run_server(block=False)``: the same start-up as `raytimm serve`), so
``serve.status()`` tells when the deployment is back to 2 running replicas. The replica is found among
this process's own descendants (tests/helpers_procs.py), never in another Ray on the machine.

Figures (issue 10 §3 "Replica loss under load"):
- failed requests (goal 0): any answer other than 200 for valid input (or its 4xx for bad input), or
  no answer; the ingress retries a call whose replica died once on another replica;
- the latency bump: p50/p99/max of requests sent in the `--before` seconds before the kill, against
  those sent from the kill until Serve had 2 running replicas again, and the slowest request overall;
- time from the kill until Serve reports 2 running replicas again, and until a new replica process exists.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.loadgen import MixedTraffic, closed_loop, load_average, percentile  # noqa: E402
from benchmarks.serve_load import make_checkpoint  # noqa: E402
from tests import helpers_procs as procs  # noqa: E402
from tests.helpers_net import free_port  # noqa: E402


def running_model_replicas() -> int:
    """Replicas of the ModelServer deployment Serve reports RUNNING."""
    from ray import serve
    status = serve.status().applications["raytimm"].deployments["ModelServer"]
    return status.replica_states.get("RUNNING", 0)


def row(name: str, records) -> str:
    lat = [r.latency * 1000 for r in records]
    return (f"{name:>26} {len(lat):>6} {percentile(lat, 50):>8.0f} {percentile(lat, 99):>8.0f} "
            f"{max(lat) if lat else float('nan'):>8.0f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--bad-fraction", type=float, default=0.0, help="share of bad input in the traffic")
    p.add_argument("--warmup", type=float, default=10.0)
    p.add_argument("--before", type=float, default=20.0, help="seconds of measured load before the kill")
    p.add_argument("--after", type=float, default=40.0, help="seconds of load after the kill (at least until "
                                                            "2 replicas run again)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs per model replica; default (cores-0.2)/2")
    a = p.parse_args(argv)
    cores = os.cpu_count() or 1
    num_cpus = a.num_cpus if a.num_cpus is not None else round((cores - 0.2) / 2, 2)

    os.environ.pop("RAY_ADDRESS", None)
    os.environ.pop("RAYTIMM_API_TOKEN", None)
    from raytimm.serve.server import run_server, shutdown_server
    from raytimm.serve.settings import ServeSettings

    work = tempfile.mkdtemp(prefix="raytimm-replica-loss-")
    try:
        checkpoint = make_checkpoint(a.model, a.num_classes, work)
        print(f"model {a.model} @224 px, {a.num_classes} classes, CPU; 2 model replicas x {num_cpus} CPU; "
              f"concurrency {a.concurrency}; {cores} cores; load average {load_average()}", flush=True)
        url = run_server(ServeSettings(checkpoint=checkpoint, port=free_port(), replicas=2, num_cpus=num_cpus),
                         block=False)
        traffic = MixedTraffic(max_upload_mb=20.0, bad_fraction=a.bad_fraction)
        pids = procs.find(os.getpid(), procs.MODEL_REPLICA)
        assert len(pids) == 2, pids
        stop = threading.Event()
        records: list = []

        def load():
            records.extend(closed_loop(url, traffic, a.concurrency, stop.is_set, seed=3))

        loader = threading.Thread(target=load)
        loader.start()
        t_start = time.monotonic()
        time.sleep(a.warmup + a.before)
        os.kill(pids[0], signal.SIGKILL)
        killed = time.monotonic()
        new_process = recovered = None
        seen_down = False
        while time.monotonic() - killed < max(a.after, 1.0) or recovered is None:
            running = running_model_replicas()
            seen_down = seen_down or running < 2
            now_pids = procs.find(os.getpid(), procs.MODEL_REPLICA)
            if new_process is None and set(now_pids) - set(pids):
                new_process = time.monotonic()
            if recovered is None and running == 2 and (seen_down or new_process):
                recovered = time.monotonic()
            if time.monotonic() - killed > 600:
                break
            time.sleep(0.2)
        stop.set()
        loader.join()
    finally:
        try:
            shutdown_server(stop_ray=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    failed = [r for r in records if r.status != r.expected]
    before = [r for r in records if killed - a.before <= r.start < killed and r.start >= t_start + a.warmup]
    until_back = [r for r in records if killed <= r.start < (recovered or float("inf"))]
    after_back = [r for r in records if recovered and r.start >= recovered]
    print(f"\nrequests: {len(records)}; failed: {len(failed)} "
          f"{sorted({(r.kind, r.status) for r in failed}) if failed else ''}; load average {load_average()}")
    print(f"{'requests sent':>26} {'n':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    print(row(f"{a.before:.0f} s before the kill", before))
    print(row("kill -> 2 replicas running", until_back))
    print(row("after 2 running again", after_back))
    print(f"\nkill -> new replica process: {new_process - killed:.1f} s" if new_process else "no new process seen")
    print(f"kill -> Serve reports 2 RUNNING replicas: {recovered - killed:.1f} s" if recovered
          else "Serve did not report 2 running replicas again")
    print(f"goal: zero failed requests -> {len(failed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

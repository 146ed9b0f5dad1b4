"""Soak: sustained closed-loop mixed traffic against `raytimm serve`, watching errors, latency drift and memory.

    python benchmarks/serve_soak.py                  # 120 s at concurrency 16 after a 20 s warm-up
    python benchmarks/serve_soak.py --duration 30    # shorter

The real CLI (`raytimm serve --replicas 2 --metrics-export-port P`) serves resnet18 @ 224 px (random
weights: speed and memory do not depend on them). Traffic (benchmarks/loadgen.py): JPEG and PNG,
1-4 files per request, and about 10 % bad input, each kind with the 4xx it must get: text and a
truncated JPEG (415), a body over --max-upload-mb (413), a bad top_k (422).

Figures (issue 10 §3 "Soak"), with their goals:
- requests served, 5xx (goal 0) and requests with no answer;
- bad input answered with anything but its expected 4xx, and valid input not answered 200 (goal 0);
- p50/p99 of valid requests per minute (goal: the last minute's p99 within 1.5x of the first);
- resident memory (VmRSS from /proc) of each model replica, the ingress replica and the HTTP proxy,
  after warm-up and at the end (goal: growth under 10 %);
- raytimm's own request counter (scraped from the metrics export port) against the client's count.
The clients run on the same machine and compete with the server for its cores.
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.loadgen import EXPECTED, MixedTraffic, closed_loop, load_average, percentile  # noqa: E402
from benchmarks.serve_load import make_checkpoint, start_server, stop_server  # noqa: E402
from tests import helpers_procs as procs  # noqa: E402
from tests.helpers_net import free_port  # noqa: E402

ROLES = {"model replica": procs.MODEL_REPLICA, "ingress replica": procs.INGRESS_REPLICA, "proxy": procs.PROXY}
REPORT_INTERVAL_S = 10.0  # Ray's default metrics report interval


def server_processes(root: int) -> dict:
    """{pid: role} of the Serve processes under the `raytimm serve` process ``root``."""
    return {pid: role for role, name in ROLES.items() for pid in procs.find(root, name)}


def rss_mib(pids: dict) -> dict:
    """{pid: resident MiB} (None for a process that is gone)."""
    out = {}
    for pid in pids:
        rss = procs.rss_bytes(pid)
        out[pid] = None if rss is None else rss / 2**20
    return out


def requests_by_code(metrics_url: str) -> dict:
    """{code: count} of ray_raytimm_requests_total on /predict, summed over the ingress processes."""
    from prometheus_client.parser import text_string_to_metric_families
    counts: dict = collections.Counter()
    for family in text_string_to_metric_families(requests.get(metrics_url, timeout=10).text):
        for s in family.samples:
            if s.name == "ray_raytimm_requests_total" and s.labels.get("route") == "/predict":
                counts[int(s.labels["code"])] += int(s.value)
    return dict(counts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=120.0, help="measured seconds (default 120)")
    p.add_argument("--warmup", type=float, default=20.0, help="seconds of the same load before measuring")
    p.add_argument("--window", type=float, default=60.0, help="seconds per latency row (default: a minute)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--bad-fraction", type=float, default=0.1)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--num-cpus", type=float, default=None,
                   help="CPUs per model replica; default (cores - 0.2) / replicas")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--max-upload-mb", type=float, default=2.0)
    a = p.parse_args(argv)
    cores = os.cpu_count() or 1
    num_cpus = a.num_cpus if a.num_cpus is not None else round((cores - 0.2) / a.replicas, 2)

    work = tempfile.mkdtemp(prefix="raytimm-soak-")
    proc = None
    try:
        checkpoint = make_checkpoint(a.model, a.num_classes, work)
        traffic = MixedTraffic(max_upload_mb=a.max_upload_mb, bad_fraction=a.bad_fraction)
        port, metrics_port = free_port(), free_port()
        print(f"model {a.model} @224 px, {a.num_classes} classes, CPU; {a.replicas} model replicas x {num_cpus} CPU; "
              f"concurrency {a.concurrency}; {a.bad_fraction:.0%} bad input; {cores} cores; "
              f"load average {load_average()}", flush=True)
        proc = start_server(checkpoint, port, num_cpus, a.max_batch_size, a.batch_wait_ms,
                            os.path.join(work, "serve.log"),
                            extra_args=["--replicas", str(a.replicas), "--max-upload-mb", str(a.max_upload_mb),
                                        "--metrics-export-port", str(metrics_port)])
        url = f"http://127.0.0.1:{port}"
        server = server_processes(proc.pid)

        end_warmup = time.monotonic() + a.warmup
        warm = closed_loop(url, traffic, a.concurrency, lambda: time.monotonic() >= end_warmup, seed=1)
        rss_start = rss_mib(server)
        t0 = time.monotonic()
        stop_at = t0 + a.duration
        records = closed_loop(url, traffic, a.concurrency, lambda: time.monotonic() >= stop_at, seed=2)
        rss_end = rss_mib(server)
        elapsed = time.monotonic() - t0
        survivors = server_processes(proc.pid)
        # raytimm's counters reach the export port after the report interval.
        time.sleep(1.5 * REPORT_INTERVAL_S)
        exported = requests_by_code(f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        if proc is not None:
            stop_server(proc)
        shutil.rmtree(work, ignore_errors=True)

    valid = [r for r in records if r.kind == "valid"]
    ok = [r for r in valid if r.status == 200]
    server_errors = [r for r in records if r.status >= 500]
    no_answer = [r for r in records if r.status == 0]
    wrong = collections.Counter((r.kind, r.status) for r in records if r.status != r.expected)
    by_kind = collections.Counter(r.kind for r in records)
    print(f"\nmeasured {elapsed:.0f} s: {len(records)} requests ({len(ok)} valid answered 200, "
          f"{sum(r.files for r in ok)} images), {len(records) / elapsed:.1f} req/s; load average {load_average()}")
    print("requests by kind: " + ", ".join(f"{k} {by_kind[k]} (expect {EXPECTED[k]})" for k in EXPECTED))
    print(f"5xx: {len(server_errors)}   no answer: {len(no_answer)}   "
          f"answered other than expected: {sum(wrong.values())} {dict(wrong) if wrong else ''}")

    print(f"\n{'window':>10} {'valid':>6} {'p50 ms':>8} {'p99 ms':>8}")
    rows = []
    n_windows = max(1, int(round(a.duration / a.window)))
    for w in range(n_windows):
        lo, hi = t0 + w * a.window, t0 + (w + 1) * a.window
        lat = [r.latency * 1000 for r in ok if lo <= r.end < hi]
        rows.append((percentile(lat, 50), percentile(lat, 99)))
        print(f"{f'{w * a.window:.0f}-{(w + 1) * a.window:.0f}s':>10} {len(lat):>6} {rows[-1][0]:>8.0f} "
              f"{rows[-1][1]:>8.0f}")

    print(f"\n{'process':>16} {'pid':>8} {'RSS start MiB':>14} {'RSS end MiB':>12} {'growth':>7}")
    growths = []
    for pid, role in sorted(server.items(), key=lambda x: x[1]):
        start, end = rss_start.get(pid), rss_end.get(pid)
        growth = (end / start - 1) if start and end else float("nan")
        growths.append(growth)
        print(f"{role:>16} {pid:>8} {start or float('nan'):>14.1f} {end or float('nan'):>12.1f} {growth:>7.1%}")
    if set(survivors) != set(server):
        print(f"server processes changed during the run: {server} -> {survivors}")

    client_counts = collections.Counter(r.status for r in warm + records if r.status)
    print(f"\nraytimm_requests_total on /predict by code (export port): {dict(sorted(exported.items()))}; "
          f"client saw {dict(sorted(client_counts.items()))} (warm-up included)")

    ratio = rows[-1][1] / rows[0][1] if rows[0][1] else float("nan")
    print("\ngoals:")
    print(f"  5xx = 0 -> {len(server_errors)}; unanswered = 0 -> {len(no_answer)}; "
          f"wrong status = 0 -> {sum(wrong.values())}")
    print(f"  last window p99 <= 1.5x first -> {ratio:.2f}x")
    print(f"  RSS growth < 10 % -> max {max(growths):.1%}" if growths else "  RSS: no server processes found")
    return 0


if __name__ == "__main__":
    sys.exit(main())

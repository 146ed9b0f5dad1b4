"""Bucket outage: what raytimm's storage retries ride out, how long they take to give up, and what a
10 s outage during a checkpoint upload costs a training run.

    python benchmarks/bucket_outage.py              # both parts
    python benchmarks/bucket_outage.py --skip-train # only the retry timings (no Ray; about 2-3 minutes)
    python benchmarks/bucket_outage.py --skip-retries # only the training run

Part 1, retry timings (moto's S3 server behind tests/fixtures/outage.py's proxy, in this process):
- a storage call during a 10 s cut (started right after the cut): rides it out, and how long it took;
- a call during a cut that never ends: how long until StorageError with the default budget
  (botocore legacy mode, ``storage.MAX_ATTEMPTS``), with a request's budget
  (``retry_budget(REQUEST_MAX_ATTEMPTS)``, what Serve's /inference/quick uses), and for pyarrow's
  filesystem (Ray's own files, ``PYARROW_MAX_ATTEMPTS``). The default budget's waits are random
  (rand(0,1) * 2**i s before retry i), so its figure is one draw, not a bound.

Part 2, training (the test itself, ``tests/test_bucket_outage.py -k rides_out`` with
``BENCH_OUTAGE_REPORT``): `raytimm train`, 2 workers, 2 epochs of test_resnet at 32 px, with a 10 s
cut from the first request of the first checkpoint upload, then the same run without a cut on the same
Ray; wall time of each command and their ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.loadgen import load_average  # noqa: E402


def _timed(fn) -> tuple[float, str]:
    start = time.monotonic()
    try:
        fn()
        outcome = "ok"
    except Exception as exc:  # noqa: BLE001 - the outcome is the figure
        outcome = f"{type(exc).__name__}: {str(exc)[:140]}"
    return time.monotonic() - start, outcome


def retry_timings(outage_s: float, request_repeats: int) -> None:
    """Part 1: see the module docstring."""
    import boto3

    from raytimm import storage
    from tests.fixtures.outage import OutageProxy
    from tests.fixtures.s3 import FAKE_ACCESS_KEY, FAKE_SECRET_KEY, REGION, start_moto_server

    server, endpoint = start_moto_server()
    host, port = endpoint.rsplit("//", 1)[1].split(":")
    proxy = OutageProxy(host, int(port))
    os.environ.update(AWS_ACCESS_KEY_ID=FAKE_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=FAKE_SECRET_KEY,
                      AWS_ENDPOINT_URL=proxy.endpoint, AWS_DEFAULT_REGION=REGION,
                      AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_CONFIG_FILE=os.devnull)
    os.environ.pop("AWS_MAX_ATTEMPTS", None)
    boto3.client("s3", endpoint_url=endpoint, region_name=REGION).create_bucket(Bucket="bench")
    storage.write_text("s3://bench/x/meta.json", "{}")
    uri = "s3://bench/x/meta.json"
    try:
        print(f"part 1: retries (botocore {storage.RETRY_MODE} mode, {storage.MAX_ATTEMPTS} attempts; "
              f"request budget {storage.REQUEST_MAX_ATTEMPTS}; pyarrow {storage.PYARROW_MAX_ATTEMPTS})", flush=True)
        proxy.cut_for(outage_s)
        took, outcome = _timed(lambda: storage.read_text(uri))
        print(f"  read during a {outage_s:g} s cut (default budget): {outcome} after {took:.1f} s", flush=True)
        time.sleep(1)
        fs, path = storage.get_filesystem("s3://bench/x")
        proxy.cut_for(outage_s)
        took, outcome = _timed(lambda: fs.open_input_stream(f"{path}/meta.json").read())
        print(f"  pyarrow read during a {outage_s:g} s cut: {outcome} after {took:.1f} s", flush=True)
        time.sleep(1)

        proxy.cut()
        fails = []
        for _ in range(request_repeats):
            def request_read():
                with storage.retry_budget(storage.REQUEST_MAX_ATTEMPTS):
                    storage.read_text(uri)
            fails.append(_timed(request_read))
        print(f"  endless cut, request budget: {', '.join(f'{t:.1f}' for t, _ in fails)} s to fail "
              f"({fails[0][1]})", flush=True)
        took, outcome = _timed(lambda: fs.open_input_stream(f"{path}/meta.json").read())
        print(f"  endless cut, pyarrow: {took:.1f} s to fail ({outcome})", flush=True)
        took, outcome = _timed(lambda: storage.read_text(uri))
        print(f"  endless cut, default budget: {took:.1f} s to fail ({outcome})", flush=True)
    finally:
        proxy.close()
        server.stop()


def training_run() -> None:
    """Part 2: see the module docstring."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "outage.json"
        env = {**os.environ, "BENCH_OUTAGE_REPORT": str(report), "PYTHONPATH": str(REPO)}
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "tests/test_bucket_outage.py", "-k", "rides_out"], cwd=REPO, env=env,
                           capture_output=True, text=True)
        if r.returncode != 0 or not report.exists():
            print((r.stdout + r.stderr)[-4000:])
            raise SystemExit("the outage test failed; no figures")
        got = json.loads(report.read_text())
    print(f"part 2: `raytimm train` (2 workers, 2 epochs), {got['outage_s']} s cut during the first checkpoint "
          f"upload: {got['with_outage_s']:.1f} s; the same run without a cut: {got['without_s']:.1f} s; "
          f"ratio {got['with_outage_s'] / got['without_s']:.2f}x, "
          f"difference {got['with_outage_s'] - got['without_s']:.1f} s",
          flush=True)
    print(f"  cut {got['cut_after_s']:.1f} s after the command started; `latest` first seen naming "
          + ", ".join(f"{k} at {v:.1f} s" for k, v in sorted(got["latest_seen_after_s"].items()))
          + "; without a cut: " + ", ".join(f"{k} at {v:.1f} s" for k, v in
                                           sorted(got["baseline_latest_seen_after_s"].items())), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--outage-s", type=float, default=10.0, help="length of the short outage in part 1")
    p.add_argument("--request-repeats", type=int, default=5, help="failures timed with a request's budget")
    p.add_argument("--skip-train", action="store_true", help="only part 1")
    p.add_argument("--skip-retries", action="store_true", help="only part 2")
    a = p.parse_args()
    print(f"load average at start: {load_average()}", flush=True)
    if not a.skip_retries:
        retry_timings(a.outage_s, a.request_repeats)
    if not a.skip_train:
        training_run()
    print(f"load average at end: {load_average()}", flush=True)


if __name__ == "__main__":
    main()

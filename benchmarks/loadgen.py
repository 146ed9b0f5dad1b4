"""Closed-loop mixed HTTP traffic for the Serve benchmarks (serve_soak.py, serve_replica_loss.py).

Valid requests carry 1-4 JPEG or PNG files of a few sizes and an optional top_k; a given fraction
are bad input, each kind with the status it must get: text (415), a truncated JPEG (415), a body over
the upload limit (413) and a bad top_k (422). Every answer is kept as a ``Record`` so callers can
slice latencies by time and check each status.
"""
from __future__ import annotations

import io
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import requests
from PIL import Image

EXPECTED = {"valid": 200, "text": 415, "truncated": 415, "oversized": 413, "bad_top_k": 422}
BAD_KINDS = ("text", "truncated", "oversized", "bad_top_k")


@dataclass
class Record:
    """One request: when it was sent and answered, its kind, status (0: no answer) and the expected one."""
    start: float
    end: float
    kind: str
    status: int
    files: int

    @property
    def expected(self) -> int:
        return EXPECTED[self.kind]

    @property
    def latency(self) -> float:
        return self.end - self.start


def photo_like(seed: int, size: tuple[int, int], fmt: str) -> bytes:
    """A photo-like image (smooth gradients plus noise) encoded as JPEG or PNG."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    base = np.stack([xx * 255 / size[0], yy * 255 / size[1], (xx + yy) * 127 / sum(size)], axis=2)
    arr = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


class MixedTraffic:
    """Draws the next request (kind, multipart files, form data) with a seeded RNG per client."""

    def __init__(self, max_upload_mb: float, bad_fraction: float = 0.1, max_files: int = 4):
        self.bad_fraction = bad_fraction
        self.max_files = max_files
        sizes = [(224, 224), (256, 192), (320, 240), (180, 300)]
        self.images = [(f"img{i}.{'jpg' if fmt == 'JPEG' else 'png'}", photo_like(i, size, fmt),
                        "image/jpeg" if fmt == "JPEG" else "image/png")
                       for i, (size, fmt) in enumerate((s, f) for s in sizes for f in ("JPEG", "PNG"))]
        jpeg = self.images[0][1]
        self.truncated = jpeg[: len(jpeg) * 6 // 10]
        self.text = b"this is a text file, not an image\n" * 20
        self.oversized = os.urandom(int(max_upload_mb * 1024 * 1024) + 512 * 1024)

    def draw(self, rng: random.Random) -> tuple[str, list, dict]:
        """(kind, files, data) of the next request."""
        if rng.random() < self.bad_fraction:
            kind = rng.choice(BAD_KINDS)
        else:
            kind = "valid"
        if kind == "text":
            return kind, [("file", ("notes.txt", self.text, "text/plain"))], {}
        if kind == "truncated":
            return kind, [("file", ("cut.jpg", self.truncated, "image/jpeg"))], {}
        if kind == "oversized":
            return kind, [("file", ("huge.png", self.oversized, "image/png"))], {}
        files = [("file", rng.choice(self.images)) for _ in range(rng.randint(1, self.max_files))]
        if kind == "bad_top_k":
            return kind, files[:1], {"top_k": rng.choice(["0", "-3", "abc", "2.5"])}
        return kind, files, ({"top_k": str(rng.randint(1, 5))} if rng.random() < 0.5 else {})


def closed_loop(url: str, traffic: MixedTraffic, concurrency: int, stop: Callable[[], bool],
                token: Optional[str] = None, seed: int = 0, timeout_s: float = 120.0) -> list[Record]:
    """``concurrency`` clients, each sending its next request as soon as the last is answered, until stop()."""
    records: list[Record] = []
    lock = threading.Lock()

    def client(i: int):
        rng = random.Random(seed * 1000 + i)
        session = requests.Session()
        if token:
            session.headers["Authorization"] = f"Bearer {token}"
        while not stop():
            kind, files, data = traffic.draw(rng)
            t0 = time.monotonic()
            try:
                status = session.post(url + "/predict", files=files, data=data, timeout=timeout_s).status_code
            except requests.RequestException:
                status = 0
                session = requests.Session()  # a broken connection: start afresh
                if token:
                    session.headers["Authorization"] = f"Bearer {token}"
            with lock:
                records.append(Record(t0, time.monotonic(), kind, status, len(files)))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def percentile(values: list, p: float) -> float:
    """The p-th percentile (nearest rank) of values, in the values' unit; nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def load_average() -> str:
    """The 1/5/15-minute load average, as `uptime` prints it."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())

"""`raytimm predict` end to end on a real Ray (one head for the module) with a tiny trained checkpoint:
agreement with `evaluate --predictions`, a bucket in and out with bad files, and a killed run resumed."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raytimm import predict_output as out
from raytimm.batch_predict import predict_to_output
from raytimm.predict import evaluate_checkpoint
from tests.fixtures.s3 import FAKE_ACCESS_KEY, FAKE_SECRET_KEY, REGION
from tests.helpers_images import bomb_png, text_bytes, truncated_jpeg
from tests.helpers_ray import ray_head
from tests.test_predict import CLASSES, color_image, make_trained_checkpoint, png_bytes, write_imagefolder

pytestmark = pytest.mark.ray

FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_KEY,
                    "AWS_DEFAULT_REGION": REGION}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One 2-CPU Ray head for the module. Its workers get moto's fake credentials from its environment
    (the S3 endpoint itself is forwarded by predict, as on a real cluster)."""
    saved = {k: os.environ.get(k) for k in FAKE_CREDENTIALS}
    os.environ.update(FAKE_CREDENTIALS)
    try:
        with ray_head(2, tmp_path_factory.mktemp("ray")) as address:
            yield address
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    make_trained_checkpoint(run)
    return str(run)


def test_matches_evaluate_with_two_actors(cluster, run_dir, tmp_path):
    data = write_imagefolder(tmp_path / "data", per_class_train=1, per_class_val=5)
    ev = evaluate_checkpoint(run_dir, data, split="val", predictions_csv=tmp_path / "eval.csv")
    with open(tmp_path / "eval.csv") as f:
        expected = {r["file"]: (r["predicted"], float(r["confidence"])) for r in csv.DictReader(f)}
    summary = predict_to_output(run_dir, os.path.join(data, "val"), str(tmp_path / "out"), fmt="parquet",
                                concurrency=2, batch_size=4, shard_size=6, top_k=2)
    rows = out.read_output(str(tmp_path / "out"))
    assert summary["predicted"] == summary["images"] == len(rows) == ev["num_samples"] == 15
    assert summary["errors"] == 0 and summary["shards"] == 3 and summary["images_per_s"] > 0
    got = {os.path.relpath(r["path"], data): r for r in rows}
    assert set(got) == set(expected)
    for rel, (predicted, confidence) in expected.items():
        row = got[rel]
        assert row["predicted_class"] == predicted, rel
        assert abs(row["confidence"] - confidence) <= 1e-5, rel
        assert row["top_k_classes"][0] == predicted and len(row["top_k_classes"]) == 2
        assert row["top_k_confidences"][0] == row["confidence"] >= row["top_k_confidences"][1]
        assert row["error"] == ""


@pytest.mark.s3
@pytest.mark.parametrize("scheme", ["s3", "r2"])
def test_bucket_in_and_out_with_bad_files(cluster, run_dir, s3_env, scheme):
    """Input and output in the bucket, as s3:// and as r2:// (R2 is S3-compatible; r2:// takes its own endpoint
    and region rules, here the test server)."""
    client = s3_env.client()
    good = {f"photos/{cls}/{i}.png": cls for cls in CLASSES for i in range(2)}
    for seed, (key, cls) in enumerate(good.items()):
        client.put_object(Bucket=s3_env.bucket, Key=key, Body=png_bytes(color_image(cls, seed=seed)))
    bad = {"photos/bad/notes.jpg": text_bytes(), "photos/bad/cut.jpg": truncated_jpeg(),
           "photos/bad/bomb.png": bomb_png()}
    for key, body in bad.items():
        client.put_object(Bucket=s3_env.bucket, Key=key, Body=body)
    output = s3_env.uri(f"labels/{scheme}", scheme)
    summary = predict_to_output(run_dir, s3_env.uri("photos", scheme), output, fmt="jsonl", concurrency=1, batch_size=4,
                                shard_size=4)
    assert summary["images"] == summary["predicted"] == 9 and summary["errors"] == 3
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=s3_env.bucket, Prefix=f"labels/{scheme}/")["Contents"])
    assert len(keys) == 3 and all(out.PART_RE.match(k.rsplit("/", 1)[1]) for k in keys), keys
    rows = {r["path"]: r for r in out.read_output(output)}
    assert len(rows) == 9
    for key, cls in good.items():
        row = rows[s3_env.uri(key, scheme)]
        assert (row["predicted_class"], row["error"]) == (cls, ""), row
    for key, reason in (("photos/bad/notes.jpg", "not a recognised image format"),
                        ("photos/bad/cut.jpg", "truncated"), ("photos/bad/bomb.png", "exceeds the limit")):
        row = rows[s3_env.uri(key, scheme)]
        assert row["predicted_class"] is None and row["confidence"] is None and row["top_k_classes"] is None
        assert row["error"].startswith(s3_env.uri(key, scheme) + ": ") and reason in row["error"], row
    again = predict_to_output(run_dir, s3_env.uri("photos", scheme), output, fmt="jsonl", shard_size=4)
    assert (again["skipped_shards"], again["predicted"]) == (3, 0)


def test_killed_run_resumes_without_duplicates(cluster, run_dir, tmp_path):
    """Kill the CLI (joined to the module's cluster) once some shards are committed; the rerun does the rest."""
    images = tmp_path / "images"
    for i in range(36):
        cls = CLASSES[i % 3]
        (images / cls).mkdir(parents=True, exist_ok=True)
        (images / cls / f"{i:02d}.png").write_bytes(png_bytes(color_image(cls, seed=i)))
    output = tmp_path / "out"
    args = ["predict", "--checkpoint", run_dir, "--input", str(images), "--output", str(output), "--format", "csv",
            "--shard-size", "2", "--batch-size", "1", "--concurrency", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "raytimm.cli", *args], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not out.committed_parts(str(output)):
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no shard committed in 300 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_at_kill = out.committed_parts(str(output))
    assert 0 < len(done_at_kill) < 18, f"{len(done_at_kill)} of 18 shards were committed before the kill"
    before = {name: (output / name).read_bytes() for name in done_at_kill}

    summary = predict_to_output(run_dir, str(images), str(output), fmt="csv", shard_size=2, batch_size=4)
    assert summary["skipped_shards"] == len(done_at_kill)
    assert summary["predicted"] == 36 - 2 * len(done_at_kill)
    assert {name: (output / name).read_bytes() for name in done_at_kill} == before  # untouched
    rows = out.read_output(str(output))
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) == 36
    assert set(paths) == {str(p) for p in images.rglob("*.png")}
    assert all(r["predicted_class"] == Path(r["path"]).parent.name and r["error"] == "" for r in rows)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_actor_agrees_with_cpu(cluster, run_dir, tmp_path):
    """On a GPU (fp16, channels_last) the top-1 matches the CPU run; confidences within fp16 error."""
    data = write_imagefolder(tmp_path / "data", per_class_train=1, per_class_val=3)
    cpu = predict_to_output(run_dir, os.path.join(data, "val"), str(tmp_path / "cpu"), batch_size=4)
    gpu = predict_to_output(run_dir, os.path.join(data, "val"), str(tmp_path / "gpu"), batch_size=4, num_gpus=1)
    assert cpu["predicted"] == gpu["predicted"] == 9
    for a, b in zip(out.read_output(str(tmp_path / "cpu")), out.read_output(str(tmp_path / "gpu"))):
        assert (a["path"], a["predicted_class"]) == (b["path"], b["predicted_class"])
        assert abs(a["confidence"] - b["confidence"]) < 1e-2

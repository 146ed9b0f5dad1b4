"""runs.py, the run folder's rules, without training: ranking, retention, pointers, completion, progress.json,
`raytimm status`, and storage errors that must fail a run instead of restarting it."""
import json
import math
from pathlib import Path

import pytest

from raytimm import checkpoint as ckpt
from raytimm import runs
from raytimm.errors import CheckpointError, RaytimmError, StorageError


def fake_checkpoint(run_dir: Path, epoch: int, **meta) -> str:
    """A folder that is complete by the run folder's rule (weights file + meta.json)."""
    d = run_dir / runs.checkpoint_dir_name(epoch)
    d.mkdir(parents=True, exist_ok=True)
    (d / ckpt.MODEL_FILE).write_bytes(b"weights")
    (d / ckpt.META_FILE).write_text(json.dumps({"epoch": epoch, **meta}))
    return str(d)


def m(epoch, top1):
    return {"epoch": epoch, "val/top1": top1, "val/loss": 1.0 / epoch}


# ------------------------------------------------------------------ names and ranking

def test_checkpoint_names_round_trip():
    assert runs.checkpoint_dir_name(7) == "checkpoint_000007"
    assert runs.checkpoint_epoch("s3://b/run/checkpoint_000012/") == 12
    assert runs.checkpoint_epoch("checkpoint_latest") is None and runs.checkpoint_epoch("best") is None
    assert runs.default_run_name("hf-hub:org/model").startswith("hf-hub:org_model-")


def test_ranking_ties_go_to_the_later_checkpoint_and_nan_never_wins():
    kw = dict(metric="val/top1", mode="max")
    assert runs.is_better(m(2, 50.0), m(1, 50.0), **kw)  # tie: the later one
    assert not runs.is_better(m(2, 40.0), m(1, 50.0), **kw)
    assert runs.is_better(m(1, 10.0), None, **kw)
    assert not runs.is_better(m(2, math.nan), m(1, 1.0), **kw) and not runs.is_better(m(2, math.nan), None, **kw)
    assert runs.is_better(m(2, 1.0), m(1, math.nan), **kw)
    assert not runs.is_better({"epoch": 2}, m(1, 1.0), **kw)  # no metric: never wins
    assert runs.is_better({"val/loss": 0.5}, {"val/loss": 0.5}, metric="val/loss", mode="min")
    assert not runs.is_better({"val/loss": 0.6}, {"val/loss": 0.5}, metric="val/loss", mode="min")
    # Patience's question is different: a tie is no improvement.
    assert not runs.improves(m(2, 50.0), m(1, 50.0), **kw) and runs.improves(m(2, 51.0), m(1, 50.0), **kw)

    history = [m(1, 60.0), m(2, 70.0), m(3, 70.0), m(4, 65.0), m(5, math.nan)]
    assert runs.best_of(history, **kw)["epoch"] == 3
    assert runs.best_of(history, metric="val/top1", mode="min")["epoch"] == 1
    assert runs.best_of([m(1, math.nan)], **kw) is None and runs.best_of([], **kw) is None


def test_retention_keeps_the_best_n_by_the_same_rule_plus_the_latest():
    entries = [(1, m(1, 60.0)), (2, m(2, 70.0)), (3, m(3, 70.0)), (4, m(4, 65.0)), (5, m(5, 10.0))]
    kw = dict(metric="val/top1", mode="max")
    assert runs.to_keep(entries, num_to_keep=1, **kw) == {3, 5}  # the later of the tie, and the latest
    assert runs.to_keep(entries, num_to_keep=2, **kw) == {2, 3, 5}
    assert runs.to_keep(entries, num_to_keep=1, metric="val/top1", mode="min") == {5}
    # Like Ray: a checkpoint without a usable metric ranks last.
    assert runs.to_keep([(1, m(1, math.nan)), (2, m(2, 5.0)), (3, None)], num_to_keep=1, **kw) == {2, 3}
    assert runs.to_keep([], num_to_keep=2, **kw) == set()


def test_prune_deletes_what_retention_drops_reading_unknown_metrics_from_meta(tmp_path):
    for epoch, top1 in ((1, 80.0), (2, 90.0), (3, 70.0)):
        fake_checkpoint(tmp_path, epoch, metrics=m(epoch, top1))
    (tmp_path / "checkpoint_000004").mkdir()  # torn: no files; not the latest complete one, ranks last
    (tmp_path / "checkpoint_000004" / ckpt.MODEL_FILE).write_bytes(b"half")
    fake_checkpoint(tmp_path, 5, metrics=m(5, 10.0))
    gone = runs.prune(str(tmp_path), metric="val/top1", mode="max", num_to_keep=1, known={5: m(5, 10.0)})
    assert sorted(Path(g).name for g in gone) == ["checkpoint_000001", "checkpoint_000003", "checkpoint_000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_000002", "checkpoint_000005"]


def test_persist_checkpoint_replaces_an_older_copy_whole(tmp_path):
    src = tmp_path / "tmp"
    src.mkdir()
    (src / ckpt.MODEL_FILE).write_bytes(b"new")
    (src / ckpt.META_FILE).write_text("{}")
    dest = tmp_path / "run" / "checkpoint_000001"
    fake_checkpoint(tmp_path / "run", 1)
    (dest / "stale.txt").write_text("from an earlier attempt")
    assert runs.persist_checkpoint(str(src), str(dest), move=True) == str(dest)
    assert sorted(p.name for p in dest.iterdir()) == [ckpt.META_FILE, ckpt.MODEL_FILE]
    assert (dest / ckpt.MODEL_FILE).read_bytes() == b"new" and not src.exists()
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["checkpoint_000001"]  # no temp folder left


# ------------------------------------------------------------------ publication and progress.json

def folder(run_dir, **kw):
    return runs.RunFolder(str(run_dir), run_name="r", metric="val/top1", mode="max", epochs=3, **kw)


def test_pointers_and_progress_follow_each_checkpoint_and_survive_a_restart(tmp_path):
    f = folder(tmp_path, mlflow_run_id="abc")
    f.start()
    p0 = runs.read_progress(str(tmp_path))
    assert p0["status"] == "running" and p0["epoch"] == 0 and p0["history"] == [] and p0["started_at"]
    c1, c2 = fake_checkpoint(tmp_path, 1), fake_checkpoint(tmp_path, 2)
    assert f.checkpoint_saved(c1, m(1, 50.0))
    assert f.checkpoint_saved(c2, m(2, 50.0))  # a tie: the later one becomes best
    assert ckpt.read_pointer(str(tmp_path), "best") == c2 == ckpt.read_pointer(str(tmp_path), "latest")

    # A restarted controller (a new instance) re-trains epoch 2 after resuming from checkpoint 1.
    g = folder(tmp_path)
    assert not g.checkpoint_saved(c2, m(2, 40.0))  # the pointer's 50.0 (read back) still wins
    c3 = fake_checkpoint(tmp_path, 3)
    assert not g.checkpoint_saved(c3, {**m(3, math.nan), "val/loss": math.inf})  # NaN never wins
    p = runs.read_progress(str(tmp_path))
    assert [h["epoch"] for h in p["history"]] == [1, 2, 3]  # no duplicate epoch 2
    assert p["history"][1]["val/top1"] == 40.0 and p["history"][2]["val/top1"] is None  # JSON has no NaN
    assert p["best_checkpoint"] == c2 and p["best_epoch"] == 2 and p["best_metrics"]["val/top1"] == 50.0
    assert p["latest_checkpoint"] == c3 and p["epoch"] == 3 and p["progress"] == 1.0
    assert p["mlflow_run_id"] == "abc" and p["started_at"] == p0["started_at"]
    assert p["status"] == "running" and p["finished_at"] is None

    g.finish("failed", runs.error_line(RuntimeError("disk full\nTraceback ...")))
    p = runs.read_progress(str(tmp_path))
    assert p["status"] == "failed" and p["message"] == "disk full" and p["finished_at"]
    assert "NaN" not in (tmp_path / runs.PROGRESS_FILE).read_text()


def test_progress_fields_are_documented(tmp_path):
    f = folder(tmp_path)
    f.start()
    doc = (Path(__file__).resolve().parents[1] / "docs" / "internals.md").read_text()
    for key in runs.read_progress(str(tmp_path)):
        assert f"`{key}`" in doc, key


def test_a_corrupt_progress_file_is_an_error_naming_it(tmp_path):
    (tmp_path / runs.PROGRESS_FILE).write_text("{not json")
    with pytest.raises(RaytimmError, match=r"progress\.json is not valid JSON"):
        runs.read_progress(str(tmp_path))
    assert runs.read_progress(str(tmp_path / "missing")) is None


# ------------------------------------------------------------------ completion: errors are not "not complete"

def test_completion_rule(tmp_path):
    assert runs.completed(str(tmp_path), epochs=3) is None  # no pointer: nothing there
    c2 = fake_checkpoint(tmp_path, 2, epochs_without_improvement=1)
    ckpt.write_latest_pointer(str(tmp_path), c2, m(2, 1.0))
    assert runs.completed(str(tmp_path), epochs=3) is None
    assert runs.completed(str(tmp_path), epochs=2)["checkpoint"] == c2
    assert runs.completed(str(tmp_path), epochs=3, patience=1)["early_stopped"]
    assert runs.completed(str(tmp_path), epochs=3, patience=2) is None


@pytest.mark.parametrize("content, message", [
    ('{"checkpoint": 5}', r"pointer .*latest does not name a checkpoint"),
    (b"\x00\x9f\x92\x96garbage", r"pointer .*latest is corrupt"),
    ('{"checkpoint": "checkpoint_000009", "metrics": {}}', r"'latest' pointer in .* names .*checkpoint_000009"),
])
def test_a_corrupt_latest_pointer_fails_the_completion_check(tmp_path, content, message):
    p = tmp_path / "latest"
    p.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(CheckpointError, match=message):
        runs.completed(str(tmp_path), epochs=3)


def _train_cfg(tmp_path, storage_path):
    from raytimm.config import load_config

    return load_config(None, [f"data.path={tmp_path}", f"storage.path={storage_path}", "run.name=r",
                              "mlflow.enabled=false"])


def test_train_fails_on_a_storage_error_instead_of_restarting_a_finished_run(tmp_path, monkeypatch):
    """A transient bucket error while checking for a finished run fails it, naming the URI; no worker starts."""
    import ray

    from raytimm import ray_train, storage

    def unreachable(uri, **kw):
        raise StorageError(f"{uri}: endpoint unreachable (connection refused)")

    monkeypatch.setattr(storage, "exists", unreachable)
    with pytest.raises(StorageError, match=r"s3://bucket/runs/r/latest: endpoint unreachable"):
        ray_train.train(_train_cfg(tmp_path, "s3://bucket/runs"), check=False)
    assert not ray.is_initialized()


def test_train_fails_on_an_unreadable_or_corrupt_latest_pointer(tmp_path, monkeypatch):
    import ray

    from raytimm import ray_train, storage

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "latest").write_text('["not", "a", "pointer"]')
    with pytest.raises(CheckpointError, match=r"pointer .*/runs/r/latest does not name a checkpoint"):
        ray_train.train(_train_cfg(tmp_path, tmp_path / "runs"), check=False)

    ckpt.write_latest_pointer(str(run), fake_checkpoint(run, 1), m(1, 1.0))
    real = storage.read_bytes

    def eio(uri, **kw):  # the pointer exists, but reading it fails (as root, chmod cannot make it unreadable)
        if str(uri).endswith("/latest"):
            raise StorageError(f"{uri}: cannot read (Input/output error)")
        return real(uri, **kw)

    monkeypatch.setattr(storage, "read_bytes", eio)
    with pytest.raises(StorageError, match=r"/runs/r/latest: cannot read \(Input/output error\)"):
        ray_train.train(_train_cfg(tmp_path, tmp_path / "runs"), check=False)
    assert not ray.is_initialized()


# ------------------------------------------------------------------ raytimm status

def test_status_prints_a_summary_or_the_json_and_names_a_missing_file(tmp_path, capsys):
    from raytimm.cli import main

    f = folder(tmp_path / "run", mlflow_run_id="0123abcd")
    f.start()
    f.checkpoint_saved(fake_checkpoint(tmp_path / "run", 1), m(1, 87.5))
    assert main(["status", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "run r: running, epoch 1/3 (33%)" in out and "val/top1 87.5" in out
    assert "checkpoint_000001" in out and "0123abcd" in out
    assert main(["status", str(tmp_path / "run"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["best_epoch"] == 1

    assert main(["status", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / "nothing" / "progress.json") in err


def test_newest_complete_skips_a_partial_checkpoint(tmp_path):
    """Where a rerun resumes: the newest folder with model.safetensors and meta.json, not a half-uploaded one."""
    run = tmp_path / "run"
    assert runs.newest_complete(str(run)) is None
    for epoch, names in ((1, ("model.safetensors", "train_state.pt", "meta.json")),
                         (2, ("model.safetensors", "train_state.pt", "meta.json")),
                         (3, ("model.safetensors", "train_state.pt"))):  # meta.json goes last: 3 is partial
        folder = run / runs.checkpoint_dir_name(epoch)
        folder.mkdir(parents=True)
        for name in names:
            (folder / name).write_bytes(b"x")
    assert runs.newest_complete(str(run)) == (str(run / "checkpoint_000002"), 2)


def test_status_lines_show_balanced_accuracy_and_multi_label_metrics():
    single = runs.format_progress({"run_name": "r", "status": "running", "epoch": 1, "epochs": 2,
                                   "metrics": {"val/top1": 90.0, "val/balanced_acc": 61.5, "val/loss": 0.3}})
    assert "val/balanced_acc 61.5" in single and "val/top1 90" in single
    multi = runs.format_progress({"run_name": "r", "status": "running", "epoch": 1, "epochs": 2,
                                  "metrics": {"val/mAP": 88.25, "val/f1_micro": 70.0, "val/f1_macro": 65.0}})
    assert "val/mAP 88.25" in multi and "val/f1_micro 70" in multi and "val/f1_macro 65" in multi

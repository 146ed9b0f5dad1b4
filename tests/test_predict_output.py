"""`raytimm predict` without Ray: the shard/resume rule, the three output formats, input listing, the CPU
decode stage's error rows, and one-line input errors. The Ray pipeline itself is in test_batch_predict.py."""
import json
import os

import numpy as np
import pytest

from raytimm import predict_output as out
from raytimm.batch_predict import decode_batch, list_inputs, parse_concurrency
from raytimm.cli import main
from raytimm.errors import ConfigError, DataError
from tests.helpers_images import bomb_png, rgb_jpeg, text_bytes, truncated_jpeg
from tests.test_predict import DATA_CONFIG

ROWS = [
    {"index": 1, "path": "s3://b/x/2.jpg", "predicted_class": None, "confidence": None, "top_k_classes": None,
     "top_k_confidences": None, "error": "s3://b/x/2.jpg: not an image"},
    {"index": 0, "path": "s3://b/x/1,\"odd\".jpg", "predicted_class": "red", "confidence": 0.123456789012345,
     "top_k_classes": ["red", "blue"], "top_k_confidences": [0.123456789012345, 0.1], "error": ""},
    {"index": 2, "path": "x/3.jpg", "predicted_class": "cat", "confidence": 0.9, "top_k_classes": ["cat", "indoor"],
     "top_k_confidences": [0.9, 0.7], "labels": ["cat", "indoor"], "error": ""},  # a multi-label model's row
]


def test_shards_are_named_by_their_inputs():
    paths = [f"img{i:03d}.jpg" for i in range(7)]
    shards = out.plan_shards(paths, 3, "csv")
    assert [s.paths for s in shards] == [tuple(paths[0:3]), tuple(paths[3:6]), tuple(paths[6:7])]
    assert [s.start for s in shards] == [0, 3, 6]
    assert [s.name for s in shards] == [s.name for s in out.plan_shards(list(paths), 3, "csv")]  # stable
    assert all(out.PART_RE.match(s.name) for s in shards)
    changed = out.plan_shards(paths[:6] + ["other.jpg"], 3, "csv")
    assert changed[:2] == shards[:2] and changed[2].name != shards[2].name
    with pytest.raises(ConfigError, match="--shard-size 0"):
        out.plan_shards(paths, 0, "csv")


def test_pending_skips_committed_and_refuses_parts_of_another_listing(tmp_path):
    shards = out.plan_shards([f"{i}.png" for i in range(5)], 2, "jsonl")
    out.commit_shard(str(tmp_path), shards[1], [dict(ROWS[1], index=2), dict(ROWS[1], index=3)], "jsonl")
    (tmp_path / ".part-00000-tmp.jsonl.tmp").write_text("half")  # a temp file is never a part
    committed = out.committed_parts(str(tmp_path))
    assert committed == {shards[1].name}
    assert [s.index for s in out.pending_shards(shards, committed, str(tmp_path))] == [0, 2]
    grown = out.plan_shards([f"{i}.png" for i in range(6)], 2, "jsonl")  # a file added at the end
    assert [s.index for s in out.pending_shards(grown, committed, str(tmp_path))] == [0, 2]
    other = out.plan_shards([f"{i}.png" for i in range(1, 6)], 2, "jsonl")  # shard 1 now holds other files
    with pytest.raises(DataError, match=f"{tmp_path}/{shards[1].name}.*do not match the current input listing"):
        out.pending_shards(other, committed, str(tmp_path))
    with pytest.raises(DataError, match="got 1 rows for 2 inputs"):
        out.commit_shard(str(tmp_path), shards[0], ROWS[:1], "jsonl")


@pytest.mark.parametrize("fmt", out.FORMATS)
def test_formats_round_trip(fmt):
    rows = out.sort_rows([dict(r) for r in ROWS])
    assert [r["path"] for r in rows] == ["s3://b/x/1,\"odd\".jpg", "s3://b/x/2.jpg", "x/3.jpg"]  # input order
    assert list(rows[0]) == list(out.COLUMNS)
    back = out.decode_part(out.encode_rows(rows, fmt), fmt)
    assert back == rows
    if fmt == "csv":
        header = out.encode_rows(rows, fmt).decode().splitlines()[0]
        assert header == ",".join(out.COLUMNS)


def test_list_inputs_folder_and_list_file(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for rel in ("a/2.JPG", "a/b/1.png", "notes.txt", "a/readme.md"):
        (tmp_path / rel).write_bytes(b"x")
    got = list_inputs(str(tmp_path / "a"))
    assert [g for g, _, _ in got] == [str(tmp_path / "a/2.JPG"), str(tmp_path / "a/b/1.png")]
    lst = tmp_path / "list.txt"
    lst.write_text(f"# comment\na/b/1.png\n\n{tmp_path}/a/2.JPG\na/b/1.png\ns3://bucket/k/3.jpg\n")
    got = list_inputs(str(lst))
    assert got == [("a/b/1.png", str(tmp_path / "a/b/1.png"), -1), (f"{tmp_path}/a/2.JPG", f"{tmp_path}/a/2.JPG", -1),
                   ("s3://bucket/k/3.jpg", "s3://bucket/k/3.jpg", -1)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"--input {tmp_path}/empty: no image files"):
        list_inputs(str(tmp_path / "empty"))


@pytest.mark.parametrize("text,want", [("3", 3), ("1,4", (1, 4)), (" 2 , 2 ", (2, 2))])
def test_parse_concurrency(text, want):
    assert parse_concurrency(text) == want


@pytest.mark.parametrize("text", ["0", "4,1", "x", "1,2,3"])
def test_parse_concurrency_refuses(text):
    with pytest.raises(ConfigError, match=f"--concurrency {text!r}"):
        parse_concurrency(text)


def test_decode_stage_turns_bad_files_into_error_rows(tmp_path):
    files = {"good.jpg": rgb_jpeg(40, 30), "text.jpg": text_bytes(), "cut.jpg": truncated_jpeg(),
             "bomb.png": bomb_png(), "big.jpg": rgb_jpeg(40, 30)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    uris = [str(tmp_path / n) for n in files] + [str(tmp_path / "missing.jpg")]
    sizes = [-1, -1, -1, -1, 5_000_000, -1]  # big.jpg: a listed size over the limit is refused unread
    batch = {"index": np.arange(6), "path": np.array(uris, dtype=object), "uri": np.array(uris, dtype=object),
             "size": np.array(sizes)}
    res = decode_batch(batch, data_config=DATA_CONFIG, max_pixels=64_000_000, max_bytes=1_000_000)
    assert res["image"].shape == (6, 3, 32, 32) and res["image"].dtype == np.float32
    errors = list(res["error"])
    assert errors[0] == "" and np.abs(res["image"][0]).sum() > 0
    for i, reason in ((1, "not a recognised image format"), (2, "truncated"), (3, "exceeds the limit"),
                      (4, "5.0 MB is over the 1 MB per-file limit"), (5, "cannot read")):
        assert errors[i].startswith(uris[i] + ": ") and reason in errors[i], errors[i]
        assert not res["image"][i].any()


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    rc = main(["predict", "--checkpoint", str(tmp_path), "--input", str(tmp_path / "nope"),
               "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert err == f"error: --input {tmp_path / 'nope'}: no such folder or list file"


@pytest.mark.s3
def test_cli_missing_bucket_names_the_uri(s3_env, tmp_path, capsys):
    uri = f"s3://{s3_env.bucket}-missing/photos"
    rc = main(["predict", "--checkpoint", str(tmp_path), "--input", uri, "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and uri in err and "does not exist" in err, err


def test_cli_result_json_when_everything_is_done(tmp_path, capsys):
    """A rerun of a finished job does no work (no model load, no Ray) and still reports the counts."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "1.png").write_bytes(b"x")
    shard = out.plan_shards([str(tmp_path / "in" / "1.png")], 10, "csv")[0]
    out.commit_shard(str(tmp_path / "out"), shard, [dict(ROWS[1], index=0)], "csv")
    rc = main(["predict", "--checkpoint", str(tmp_path / "no-checkpoint"), "--input", str(tmp_path / "in"),
               "--output", str(tmp_path / "out"), "--format", "csv", "--shard-size", "10",
               "--result-json", str(tmp_path / "r.json")])
    assert rc == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["skipped_shards"] == 1 and result["predicted"] == 0 and result["images"] == 1
    assert os.listdir(tmp_path / "out") == [shard.name]

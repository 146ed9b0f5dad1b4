"""`raytimm predict`'s output folder: input shards, their part files, and the resume rule. No Ray, no torch.

The rule (README "Predict a bucket", docs/internals.md):

- The input listing is sorted and cut into shards of ``shard_size`` files. Shard ``i`` is written as ONE
  file ``part-<i:05d>-<digest>.<format>``, where ``digest`` hashes the shard's paths (so the name says
  exactly which inputs it holds).
- A part file appears only complete: locally it is written to a temp file and renamed into place; in a
  bucket it is one PUT (or a multipart upload, which also becomes visible only when completed) at the
  final key. A reader never sees half a file, and a crash loses at most the shards in flight.
- A rerun lists the output folder and skips every shard whose part file is there; the other shards are
  predicted again. Rows are never appended to an existing file, so nothing is duplicated.
- A ``part-*`` file that matches no shard of the current listing (the input changed, or a different
  ``--shard-size``) stops the run with one line rather than mixing two listings in one output.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from raytimm import storage
from raytimm.errors import ConfigError, DataError

FORMATS = ("parquet", "csv", "jsonl")
# labels: a multi-label model's labels at their thresholds (by score); null for a single-label model.
COLUMNS = ("path", "predicted_class", "confidence", "top_k_classes", "top_k_confidences", "labels", "error")
PART_RE = re.compile(r"^part-(\d{5,})-([0-9a-f]{12})\.(parquet|csv|jsonl)$")
DEFAULT_SHARD_SIZE = 1000


@dataclass(frozen=True)
class Shard:
    """Input files [start, start + len(paths)) of the sorted listing, written together as one part file."""

    index: int
    start: int
    paths: tuple[str, ...]
    name: str


def check_format(fmt: str) -> str:
    """The output format, or a ConfigError listing the valid ones."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return fmt


def part_name(index: int, paths: Sequence[str], fmt: str) -> str:
    """``part-<index>-<digest of the paths>.<fmt>``: the same inputs always give the same name."""
    digest = hashlib.sha256("\n".join(paths).encode("utf-8")).hexdigest()[:12]
    return f"part-{index:05d}-{digest}.{fmt}"


def plan_shards(paths: Sequence[str], shard_size: int, fmt: str) -> list[Shard]:
    """Cut the (already sorted) input listing into shards of shard_size files."""
    if shard_size < 1:
        raise ConfigError(f"--shard-size {shard_size}: expected a number of images >= 1")
    check_format(fmt)
    shards = []
    for i in range(math.ceil(len(paths) / shard_size)):
        chunk = tuple(paths[i * shard_size:(i + 1) * shard_size])
        shards.append(Shard(i, i * shard_size, chunk, part_name(i, chunk, fmt)))
    return shards


def committed_parts(output_uri: str) -> set[str]:
    """Names of the part files already in the output folder (top level only; temp files are not parts)."""
    return {info.key for info in storage.list_files(output_uri) if "/" not in info.key and PART_RE.match(info.key)}


def pending_shards(shards: Sequence[Shard], committed: Iterable[str], output_uri: str) -> list[Shard]:
    """The shards still to predict; DataError when the output holds parts of a different listing."""
    committed = set(committed)
    wanted = {s.name for s in shards}
    stale = sorted(committed - wanted)
    if stale:
        raise DataError(f"{storage.join(output_uri, stale[0])} (and {len(stale) - 1} more part file(s)) do not match "
                        "the current input listing and --shard-size/--format: the input changed since that run; "
                        "give a new --output, or delete those files to predict everything again")
    return [s for s in shards if s.name not in committed]


def sort_rows(rows: list[dict]) -> list[dict]:
    """Rows in input order (by their ``index``), with only the output COLUMNS."""
    return [{c: r.get(c) for c in COLUMNS} for r in sorted(rows, key=lambda r: r["index"])]


def encode_rows(rows: Sequence[dict], fmt: str) -> bytes:
    """One part file's bytes. CSV holds the top-k lists as JSON arrays (CSV has no list type)."""
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("path", pa.string()), ("predicted_class", pa.string()), ("confidence", pa.float64()),
                            ("top_k_classes", pa.list_(pa.string())), ("top_k_confidences", pa.list_(pa.float64())),
                            ("labels", pa.list_(pa.string())), ("error", pa.string())])
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows], schema=schema), buf)
        return buf.getvalue()
    if fmt == "jsonl":
        return "".join(json.dumps({c: r.get(c) for c in COLUMNS}, ensure_ascii=False) + "\n" for r in rows).encode()
    if fmt == "csv":
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(COLUMNS)
        for r in rows:
            writer.writerow([_csv_cell(r.get(c)) for c in COLUMNS])
        return text.getvalue().encode("utf-8")
    raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")


def _csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value), ensure_ascii=False)
    if isinstance(value, float):
        return repr(value)  # round-trips exactly
    return str(value)


def decode_part(data: bytes, fmt: str) -> list[dict]:
    """Rows of one part file (the inverse of encode_rows; CSV's empty cells read back as None, error as "")."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data)).to_pylist()
    if fmt == "jsonl":
        return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    rows = []
    for r in csv.DictReader(io.StringIO(data.decode("utf-8"))):
        rows.append({
            "path": r["path"], "predicted_class": r["predicted_class"] or None,
            "confidence": float(r["confidence"]) if r["confidence"] else None,
            "top_k_classes": json.loads(r["top_k_classes"]) if r["top_k_classes"] else None,
            "top_k_confidences": json.loads(r["top_k_confidences"]) if r["top_k_confidences"] else None,
            "labels": json.loads(r["labels"]) if r["labels"] else None,
            "error": r["error"],
        })
    return rows


def commit_shard(output_uri: str, shard: Shard, rows: Sequence[dict], fmt: str) -> str:
    """Write one finished shard at its final name in one go (atomic rename locally, one upload in a bucket)."""
    if len(rows) != len(shard.paths):
        raise DataError(f"shard {shard.index} of {output_uri} got {len(rows)} rows for {len(shard.paths)} inputs")
    return storage.write_bytes(storage.join(output_uri, shard.name), encode_rows(rows, fmt))


def read_output(output_uri: str) -> list[dict]:
    """Every row of every part file under output_uri, in shard order (for checks and small outputs)."""
    rows: list[dict] = []
    for name in sorted(committed_parts(output_uri)):
        rows.extend(decode_part(storage.read_bytes(storage.join(output_uri, name)), name.rsplit(".", 1)[1]))
    return rows

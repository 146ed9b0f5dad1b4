"""Preflight: check a URI before any worker starts (readable, writable, or a dataset with images).

It uses the probe client (few retries): it answers someone at a terminal, so an unreachable endpoint
fails within seconds instead of riding out a minute of retries meant for a running job.
"""
from __future__ import annotations

import os
import tempfile
import threading

from raytimm.data.extensions import DICE_ANNOTATION_EXTENSIONS, IMAGE_EXTENSIONS
from raytimm.errors import StorageError
from raytimm.storage.clients import client_for, translate
from raytimm.storage.objects import head, iter_remote
from raytimm.storage.uri import StorageURI, parse_uri

PREFLIGHT_WANTS = ("read", "write", "dataset")


def preflight(uri: str | os.PathLike, *, want: str = "read") -> None:
    """Check a URI before workers start: readable, writable, or a dataset with images; else StorageError."""
    if want not in PREFLIGHT_WANTS:
        raise ValueError(f"preflight want={want!r}: expected one of {PREFLIGHT_WANTS}")
    parsed = parse_uri(uri)
    if not parsed.remote:
        _preflight_local(parsed, want)
        return
    client, endpoint = client_for(parsed, probe=True)
    with translate(parsed, "preflight", endpoint):
        if want == "write":
            _probe_write(client, parsed)
            return
        keys = _first_keys(client, parsed, want)
    if not keys:
        if parsed.key and want == "read":
            with translate(parsed, "preflight", endpoint):
                if head(client, parsed) is not None:
                    return  # a single object (e.g. a legacy best.pt)
        raise StorageError(f"{parsed}: no objects under this prefix in bucket '{parsed.bucket}'")
    if want == "dataset" and not any(_is_dataset_file(k) for k in keys):
        raise StorageError(f"{parsed}: {_no_images_message(len(keys))}")


def _first_keys(client, uri: StorageURI, want: str) -> list[str]:
    """Keys under the prefix; for 'read' one is enough, for 'dataset' stop at the first image."""
    found = []
    for key, _, _ in iter_remote(client, uri):
        found.append(key)
        if want == "read" or _is_dataset_file(key):
            break
    return found


def _probe_write(client, uri: StorageURI) -> None:
    """Put and delete a tiny object: proves the bucket exists and the keys may write."""
    probe = "/".join(p for p in (uri.key, f".raytimm-preflight-{os.getpid()}-{threading.get_ident()}") if p)
    client.put_object(Bucket=uri.bucket, Key=probe, Body=b"ok")
    client.delete_object(Bucket=uri.bucket, Key=probe)


def _is_dataset_file(key: str) -> bool:
    return key.lower().endswith(IMAGE_EXTENSIONS + DICE_ANNOTATION_EXTENSIONS)


def _no_images_message(count: int) -> str:
    return (
        f"no images under this prefix ({count} objects, none with extension "
        f"{'/'.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)} and no DICE .json)"
    )


def _preflight_local(uri: StorageURI, want: str) -> None:
    path = uri.key
    if want == "write":
        try:
            os.makedirs(path, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".raytimm-preflight-"):
                pass
        except OSError as exc:
            raise StorageError(f"{path}: not writable ({exc.strerror})") from None
        return
    if not os.path.exists(path):
        raise StorageError(f"{path}: no such file or folder")
    if want == "dataset":
        if os.path.isfile(path):
            raise StorageError(f"{path}: a dataset must be a folder, not a file")
        count = 0
        for dirpath, _, filenames in os.walk(path):
            for name in filenames:
                count += 1
                if _is_dataset_file(name):
                    return
        raise StorageError(f"{path}: {_no_images_message(count)}")

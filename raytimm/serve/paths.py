"""Which checkpoints a request may load: allowed prefixes, checked before any file or network access."""
import os
import re
from typing import TYPE_CHECKING, Union

from raytimm.errors import StorageError
from raytimm.serve.http import HTTPError

if TYPE_CHECKING:
    from raytimm.checkpoint import ResolvedCheckpoint


def _uri_scheme(path: str) -> str:
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*):", path)
    # "C:" style drive letters are not schemes, but we do not serve Windows paths either.
    return m.group(1).lower() if m else ""


def normalize_prefix(prefix: str) -> str:
    """Canonical form of an allowed prefix (absolute local path or scheme://bucket/key)."""
    from raytimm import storage
    return storage.normalize(prefix).rstrip("/") or "/"


def _is_under(uri: str, prefix: str) -> bool:
    if uri == prefix:
        return True
    return uri.startswith(prefix if prefix.endswith("/") else prefix + "/")


def check_checkpoint_path(path: str, allowed: list, *, field: str = "checkpoint_path") -> str:
    """Normalised URI of ``path`` if it lies under an allowed prefix; HTTPError(403) naming ``field`` otherwise.

    Purely syntactic: no file or network access happens before the path is accepted.
    """
    from raytimm import storage

    text = path.strip()
    if any(ord(c) < 32 for c in text):
        raise HTTPError(403, f"{field} contains control characters")
    shown = text[:200]
    if re.search(r"(^|[\\/])\.\.([\\/]|$)", text):
        raise HTTPError(403, f"{field} {shown!r}: '..' is not allowed")
    scheme = _uri_scheme(text)
    if scheme and scheme not in ("s3", "r2"):
        raise HTTPError(403, f"{field} {shown!r}: scheme '{scheme}:' is not allowed (use s3:// or r2:// "
                             "or an absolute path under an allowed prefix)")
    if not scheme and (not text.startswith("/") or text.startswith("~")):
        raise HTTPError(403, f"{field} {shown!r}: local paths must be absolute")
    try:
        uri = storage.normalize(text)
    except StorageError as e:
        raise HTTPError(403, f"{field} {shown!r}: {e}") from None
    for prefix in allowed:
        if _is_under(uri, prefix):
            return uri
    raise HTTPError(403, f"{field} {shown!r} is not under an allowed prefix")


def check_resolved_path(uri: str, allowed: list, *, what: str = "checkpoint") -> None:
    """After resolving pointers/symlinks (file access is fine now), the target must still be allowed."""
    from raytimm import storage
    if storage.is_remote(uri):
        candidates = [uri]
    else:
        candidates = [os.path.realpath(uri)]
        allowed = [os.path.realpath(p) if not storage.is_remote(p) else p for p in allowed]
    if not any(_is_under(c, p) for c in candidates for p in allowed):
        raise HTTPError(403, f"{what} {uri} (resolved) is not under an allowed prefix")


def storage_root(checkpoint: Union[str, "ResolvedCheckpoint"]) -> str:
    """Default allowed prefix for a startup checkpoint: the bucket, or locally the run folder's parent.

    A local checkpoint lives at ``<storage.path>/<run>/<checkpoint>``, so its grandparent is the
    storage root; a legacy ``.pt`` file allows its own folder. Takes a URI or an already resolved one.
    """
    from raytimm import checkpoint as ckpt
    from raytimm import storage

    resolved = ckpt.resolve_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
    parsed = storage.parse_uri(resolved.uri)
    if parsed.remote:
        return f"{parsed.scheme}://{parsed.bucket}"
    path = os.path.realpath(parsed.key)
    if resolved.kind == "legacy_pt":
        return os.path.dirname(path)
    return os.path.dirname(os.path.dirname(path)) or "/"

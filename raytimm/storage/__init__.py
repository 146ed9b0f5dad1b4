"""Object storage: local paths, ``file://``, ``s3://`` and ``r2://``. The only package that knows S3/R2.

One module per job; the public API is re-exported here, so callers write ``storage.join(...)``:

- :mod:`~raytimm.storage.uri`: parse, normalise and join URIs; ``local_path`` strips ``file://``.
- :mod:`~raytimm.storage.clients`: endpoint and region (**process settings**, set by ``configure``;
  see that module for why), boto3 and pyarrow clients with deliberate retries (``retry_budget`` shortens
  boto3's for a call someone waits on; pyarrow's, used only by training, keep theirs), errors -> StorageError.
- :mod:`~raytimm.storage.objects`: list, exists, read, write, delete.
- :mod:`~raytimm.storage.transfer`: upload and download with fixed-size multipart parts (R2).
- :mod:`~raytimm.storage.staging`: a bucket prefix mirrored into the node cache, kept current by ETag.
- :mod:`~raytimm.storage.checks`: the preflight (reachable, writable, a dataset, before any worker starts).
"""
from raytimm.storage.clients import (
    CONNECT_TIMEOUT_S,
    MAX_ATTEMPTS,
    PROBE_MAX_ATTEMPTS,
    PYARROW_MAX_ATTEMPTS,
    READ_TIMEOUT_S,
    REQUEST_MAX_ATTEMPTS,
    RETRY_MODE,
    client_config,
    configure,
    endpoint_for,
    get_filesystem,
    retry_budget,
    s3_client,
)
from raytimm.storage.objects import (
    ObjectInfo,
    delete,
    exists,
    list_files,
    read_bytes,
    read_text,
    write_bytes,
    write_text,
)
from raytimm.storage.checks import PREFLIGHT_WANTS, preflight
from raytimm.storage.staging import StageResult, cache_dir_name, stage, stage_prefix
from raytimm.storage.transfer import DEFAULT_PART_SIZE, MIN_PART_SIZE, download, upload
from raytimm.storage.uri import SCHEMES, StorageURI, is_remote, join, local_path, normalize, parse_uri

__all__ = [
    "CONNECT_TIMEOUT_S", "DEFAULT_PART_SIZE", "MAX_ATTEMPTS", "MIN_PART_SIZE", "PREFLIGHT_WANTS",
    "PROBE_MAX_ATTEMPTS", "PYARROW_MAX_ATTEMPTS", "READ_TIMEOUT_S", "REQUEST_MAX_ATTEMPTS", "RETRY_MODE", "SCHEMES",
    "ObjectInfo", "StageResult", "StorageURI", "cache_dir_name", "client_config", "configure", "delete", "download",
    "endpoint_for", "exists", "get_filesystem", "is_remote", "join", "list_files", "local_path", "normalize",
    "parse_uri", "preflight", "read_bytes", "read_text", "retry_budget", "s3_client", "stage", "stage_prefix",
    "upload", "write_bytes", "write_text",
]

"""pyarrow's S3FileSystem with raytimm's retry settings, also after Ray pickles it to workers.

Ray ships ``RunConfig(storage_filesystem=...)`` to the Train controller and workers by pickling, and
pyarrow's own ``S3FileSystem.__reduce__`` drops ``retry_strategy`` (the copy falls back to pyarrow's
3 attempts). This subclass pickles its retry count along and rebuilds the strategy on the other side.
Imported only when a bucket filesystem is made (or a pyarrow error is translated), so importing
raytimm.storage stays free of pyarrow.
"""
from __future__ import annotations

import re

import pyarrow.fs as pafs

from raytimm.errors import StorageError


class RetryingS3FileSystem(pafs.S3FileSystem):
    """``S3FileSystem(**kwargs)`` with ``AwsDefaultS3RetryStrategy(max_attempts)``, kept when pickled."""

    def __init__(self, max_attempts: int, **kwargs):
        super().__init__(retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=max_attempts), **kwargs)
        self.max_attempts = max_attempts
        self._kwargs = kwargs

    def __reduce__(self):
        return _rebuild, (self.max_attempts, self._kwargs)


def _rebuild(max_attempts: int, kwargs: dict) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(max_attempts, **kwargs)


# pyarrow's S3 errors read "When <doing> for key 'K' in bucket 'B': AWS Error <CODE> during <Op> operation: ...".
_ARROW_WHERE = re.compile(r"for key '([^']*)' in bucket '([^']*)'")
_ARROW_WHAT = re.compile(r"AWS Error (\w+) during (\w+) operation")


def arrow_storage_error(exc: BaseException, scheme: str) -> StorageError | None:
    """A pyarrow S3 OSError (Ray Train writes its own files with pyarrow) as a one-line StorageError
    naming ``scheme://bucket/key``; None when ``exc`` is not one. Only the key, bucket, error code and
    operation are taken from pyarrow's text (it names the endpoint host, never credentials)."""
    if not isinstance(exc, OSError):  # a StorageError is no OSError: it never comes here
        return None
    text = str(exc)
    where = _ARROW_WHERE.search(text)
    if where is None:
        return None
    what = _ARROW_WHAT.search(text)
    uri = f"{scheme}://{where.group(2)}/{where.group(1)}"
    if what is None:
        return StorageError(f"{uri}: Ray Train's write or read failed (pyarrow {type(exc).__name__})")
    code, op = what.groups()
    if code == "NETWORK_CONNECTION":
        return StorageError(f"{uri}: cannot reach the storage endpoint during {op} (Ray Train's own file; "
                            "its retries ran out)")
    return StorageError(f"{uri}: {op} failed ({code}; Ray Train's own file)")

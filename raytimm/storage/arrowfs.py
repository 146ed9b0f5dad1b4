"""pyarrow's S3FileSystem with raytimm's retry settings, also after Ray pickles it to workers.

Ray ships ``RunConfig(storage_filesystem=...)`` to the Train controller and workers by pickling, and
pyarrow's own ``S3FileSystem.__reduce__`` drops ``retry_strategy`` (the copy falls back to pyarrow's
3 attempts). This subclass pickles its retry count along and rebuilds the strategy on the other side.
Imported only when a bucket filesystem is made, so importing raytimm.storage stays free of pyarrow.
"""
from __future__ import annotations

import pyarrow.fs as pafs


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

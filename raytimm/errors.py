"""Exception types. Every user-facing failure is one of these, so the CLI can print one line.

The message of each error names the thing that was wrong (file, key, URI, field) and, where
possible, what would be right. Messages never contain credentials.
"""


class RaytimmError(Exception):
    """Base class: the CLI prints ``error: <message>`` and exits non-zero, without a traceback."""


class ConfigError(RaytimmError):
    """A config file, key, value or platform request is invalid."""


class DataError(RaytimmError):
    """A dataset is missing, empty or laid out wrongly."""


class ImageError(DataError):
    """Bytes or a file could not be decoded as an image (not an image, truncated, corrupt)."""


class ImageTooLargeError(ImageError):
    """An image exceeds the pixel or byte limit (decompression-bomb guard)."""


class StorageError(RaytimmError):
    """A storage URI is malformed, unreachable, forbidden or missing. Never includes secrets."""


class CheckpointError(RaytimmError):
    """A checkpoint is malformed or cannot be loaded."""


class CheckpointNotFound(CheckpointError):
    """No checkpoint exists at the given URI."""


class ExportError(RaytimmError):
    """A model could not be exported, or the export does not reproduce the PyTorch model's outputs."""


def is_retryable(error: BaseException) -> bool:
    """Whether restarting the training workers could fix ``error`` (raised inside a worker).

    A raytimm error names a config key, a file or a checkpoint that a restart cannot change, so
    it is not retried. StorageError is the exception: a bucket outage can end between attempts,
    and a restart resumes from the last complete checkpoint. Anything else (a killed process, a
    lost node, a CUDA or collective error) is a crash, retried up to run.max_failures times.
    """
    return not isinstance(error, RaytimmError) or isinstance(error, StorageError)

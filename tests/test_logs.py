"""raytimm.logs.KnownErrorTracebackFilter: which relayed worker tracebacks a user sees."""
import logging

import pytest

from raytimm.logs import KnownErrorTracebackFilter


def _record(msg: str) -> logging.LogRecord:
    return logging.LogRecord("ray.train.v2._internal.util", logging.ERROR, __file__, 1, msg, None, None)


def _traceback(last_line: str) -> str:
    return ("Error in training function:\nTraceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
            f"{last_line}")


@pytest.mark.parametrize("msg,kept", [
    # A raytimm error that is not retried: its one line is the run's last line, so the traceback goes.
    (_traceback("raytimm.errors.ConfigError: data.path 'x' does not exist"), False),
    (_traceback("raytimm.errors.DataError: bad label"), False),
    # Storage errors are retried and crashes are not ours: their tracebacks stay.
    (_traceback("raytimm.errors.StorageError: s3://b/k: timed out"), True),
    (_traceback("ValueError: boom"), True),
    # Not Train's worker-error message, even if it names a raytimm error.
    ("raytimm.errors.ConfigError: something", True),
    ("some other line\nraytimm.errors.ConfigError: x", True),
])
def test_only_a_non_retried_raytimm_errors_traceback_is_dropped(msg, kept):
    assert KnownErrorTracebackFilter().filter(_record(msg)) is kept

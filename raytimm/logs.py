"""Quiet logs: keep what a user can act on, drop third-party noise they cannot.

Ray, MLflow and friends log plenty at INFO that says nothing about the user's run. We raise
their levels and drop a few known-harmless lines by pattern (see PITFALLS.md "Log noise").
``raytimm -v`` keeps everything.
"""
from __future__ import annotations

import logging
import os
import re
import warnings

# Known-harmless lines a user cannot act on. Each pattern is matched against the message.
NOISE_PATTERNS = [
    # Train V2 logs this at error level on every run; the watcher works regardless.
    re.compile(r"PreemptionWatcher.*constructor arguments in the object store"),
    re.compile(r"has constructor arguments in the object store"),
    # Train V2 logs each worker's report at INFO; the epoch summary line already says it.
    re.compile(r"Reporting training result \d+: TrainingReport"),
    re.compile(r"Tip: to disable this warning"),
    # Serve's controller logs this on every clean shutdown.
    re.compile(r"Task ServeController.graceful_shutdown failed"),
    # Local clusters always use token auth (README explains it); the notice is not actionable.
    re.compile(r"Token authentication is enabled for this Ray cluster"),
    re.compile(r"The `RunConfig` was not"),
    re.compile(r"Ray Train V2 migration"),
    re.compile(r"metrics exporter agent", re.I),
    re.compile(r"Ray Tune is making it easier to use Ray Train V2"),
]

NOISY_LOGGERS = {
    "ray": logging.WARNING,
    "ray.train": logging.WARNING,
    "ray.tune": logging.WARNING,
    "ray.serve": logging.WARNING,
    "ray.data": logging.WARNING,
    "mlflow": logging.WARNING,
    "alembic": logging.WARNING,
    "botocore": logging.WARNING,
    "boto3": logging.WARNING,
    "urllib3": logging.WARNING,
    "filelock": logging.WARNING,
    "timm": logging.WARNING,
    "PIL": logging.WARNING,
    "matplotlib": logging.WARNING,
    # The ONNX exporter's graph passes log every rewrite at INFO ("Removed 182 unused nodes").
    "onnxscript": logging.WARNING,
    "onnx_ir": logging.WARNING,
}

# Set before `import ray` so the workers Ray starts inherit them.
QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "RAY_AIR_NEW_OUTPUT": "1",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "3600",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "GIT_PYTHON_REFRESH": "quiet",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    # Train V2 reroutes print() in workers through the root logger, which shows each line twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


class NoiseFilter(logging.Filter):
    """Drops records whose message matches a known-noise pattern."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a broken record is not ours to crash on
            return True
        return not is_noise(msg)


def is_noise(line: str) -> bool:
    """True for a line that is known Ray noise (used when relaying worker output)."""
    return any(p.search(line) for p in NOISE_PATTERNS)


class _FilteredStream:
    """A text stream proxy that drops whole lines matching NOISE_PATTERNS.

    Ray relays worker and controller output (including C++ core-worker lines that no Python
    logger sees) to the driver's stdout/stderr one line at a time; this is the only place
    those can be filtered.
    """

    def __init__(self, stream):
        self._stream = stream
        self._buf = ""

    def write(self, s: str) -> int:
        self._buf += s
        if "\n" not in self._buf:
            return len(s)
        *lines, self._buf = self._buf.split("\n")
        kept = [ln for ln in lines if not is_noise(ln)]
        if kept:
            self._stream.write("\n".join(kept) + "\n")
        return len(s)

    def flush(self) -> None:
        if self._buf and not is_noise(self._buf):
            self._stream.write(self._buf)
            self._buf = ""
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def filter_std_streams() -> None:
    """Drop known Ray noise lines from this process's stdout and stderr."""
    import sys

    if not isinstance(sys.stdout, _FilteredStream):
        sys.stdout = _FilteredStream(sys.stdout)
    if not isinstance(sys.stderr, _FilteredStream):
        sys.stderr = _FilteredStream(sys.stderr)


def quiet_env() -> None:
    """Set the quiet env defaults (users' explicit settings win)."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)


def quiet_third_party() -> None:
    """Raise noisy loggers to WARNING and attach the noise filter everywhere."""
    quiet_env()
    flt = NoiseFilter()
    for name, level in NOISY_LOGGERS.items():
        lg = logging.getLogger(name)
        lg.setLevel(level)
        lg.addFilter(flt)
    for h in logging.getLogger().handlers:
        h.addFilter(flt)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(ray|timm|mlflow)\b.*")
    warnings.filterwarnings("ignore", message=r".*pkg_resources is deprecated.*")


class KnownErrorTracebackFilter(logging.Filter):
    """Drops Train's "Error in training function" traceback for a raytimm error that is not retried.

    The driver prints that error's own one-line message as the run's last line; a worker traceback
    relayed after it would bury it. Crashes and storage errors keep their traceback.
    """

    _LAST_LINE = re.compile(r"^raytimm\.errors\.(\w+): ", re.M)

    def filter(self, record: logging.LogRecord) -> bool:
        from raytimm import errors

        try:
            msg = record.getMessage()
        except Exception:  # a broken record is not ours to crash on
            return True
        found = self._LAST_LINE.findall(msg) if msg.startswith("Error in training function") else []
        cls = getattr(errors, found[-1], None) if found else None
        return not (isinstance(cls, type) and issubclass(cls, Exception) and not errors.is_retryable(cls("")))


# Train V2 logs a worker's exception there (ray/train/v2/_internal/util.py).
TRAIN_FN_ERROR_LOGGER = "ray.train.v2._internal.util"


def worker_logging_setup() -> None:
    """Inside Ray workers: the same quiet levels (they do not run the CLI's setup)."""
    quiet_third_party()
    train_fn_logger = logging.getLogger(TRAIN_FN_ERROR_LOGGER)
    if not any(isinstance(f, KnownErrorTracebackFilter) for f in train_fn_logger.filters):
        train_fn_logger.addFilter(KnownErrorTracebackFilter())
    raytimm_logger = logging.getLogger("raytimm")
    if not raytimm_logger.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(message)s"))
        raytimm_logger.addHandler(h)
        raytimm_logger.setLevel(logging.INFO)
        raytimm_logger.propagate = False

"""HTTP-facing pure helpers: the client error type, raytimm error -> status, form-field parsing.

No Serve or FastAPI imports, so these are tested without a server.
"""
import re
from typing import Any, Optional

from raytimm.errors import (CheckpointError, CheckpointNotFound, ConfigError, DataError, ImageError,
                            ImageTooLargeError, RaytimmError, StorageError)

MAX_FILES = 64  # `file` fields per request
MAX_TOP_K_DIGITS = 9


class HTTPError(Exception):
    """A client-facing error: status code and a one-line detail."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def error_status(exc: BaseException) -> int:
    """HTTP status for a raytimm error raised while serving a request."""
    if isinstance(exc, HTTPError):
        return exc.status
    if isinstance(exc, ImageTooLargeError):
        return 413
    if isinstance(exc, ImageError):
        return 415
    if isinstance(exc, CheckpointNotFound):
        return 404
    if isinstance(exc, (CheckpointError, ConfigError, DataError)):
        return 422
    if isinstance(exc, StorageError):
        return 502
    return 500


def error_payload(exc: BaseException) -> dict:
    """``{"error": {status, detail}}``: how the model deployment hands an error back to the ingress."""
    status = error_status(exc)
    # Our own errors name the file/URI and never hold secrets; anything else is a bug, not shown.
    known = isinstance(exc, (HTTPError, RaytimmError))
    detail = str(exc) if known else "internal error while running the model"
    return {"error": {"status": status, "detail": detail}}


def parse_top_k(raw: Any, default: int = 5) -> int:
    """Parse the top_k form field: a positive integer (422 otherwise); clamping happens per model."""
    if raw is None or (isinstance(raw, str) and raw.strip() == ""):
        return default
    if not isinstance(raw, str):
        raise HTTPError(422, "top_k must be a positive integer, got a file upload")
    text = raw.strip()
    if not re.fullmatch(r"[+-]?\d+", text):
        raise HTTPError(422, f"top_k must be a positive integer, got {text[:20]!r}")
    if not text.startswith("-") and len(text.lstrip("+0")) > MAX_TOP_K_DIGITS:
        return 10 ** MAX_TOP_K_DIGITS  # absurdly large: clamped to the class count later
    value = int(text)
    if value < 1:
        raise HTTPError(422, f"top_k must be >= 1, got {value}")
    return value


_NUMBER = re.compile(r"\+?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d{1,3})?")


def parse_threshold(form) -> Optional[float]:
    """The optional ``threshold`` form field: a number in [0, 1]; None when absent; 422 for anything else."""
    if "threshold" not in form:
        return None
    raw = form.get("threshold")
    if not isinstance(raw, str):
        raise HTTPError(422, "threshold must be a number between 0 and 1, got a file upload")
    text = raw.strip()
    if not _NUMBER.fullmatch(text[:40]) or len(text) > 40 or not 0.0 <= float(text) <= 1.0:
        raise HTTPError(422, f"threshold must be a number between 0 and 1, got {text[:20]!r}")
    return float(text)


def text_field(form, name: str) -> Optional[str]:
    """A form's text field, stripped; None when absent or blank; 422 when it is a file."""
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise HTTPError(422, f"{name} must be a text field")
    return value.strip() or None


def int_field(form, name: str) -> Optional[int]:
    """A form's positive integer field (at most 7 digits); None when absent."""
    text = text_field(form, name)
    if text is None:
        return None
    if not re.fullmatch(r"\d{1,7}", text) or int(text) < 1:
        raise HTTPError(422, f"{name} must be a positive integer, got {text[:20]!r}")
    return int(text)


def check_name_syntax(name: str) -> None:
    """422 unless ``name`` could be a timm model name at all (letters, digits, ``_.-``; no timm import)."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,100}", name):
        raise HTTPError(422, f"model_name {name[:100]!r} is not a timm model")


def check_pretrained_name(name: str) -> None:
    """422 unless ``name`` is a timm model name (checked before anything is built)."""
    check_name_syntax(name)
    import timm
    if not timm.is_model(name):
        raise HTTPError(422, f"model_name {name[:100]!r} is not a timm model")

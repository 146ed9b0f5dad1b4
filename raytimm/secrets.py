"""Remove secrets from config trees and URLs before they are written (meta.json) or logged (MLflow).

Stdlib only, so both :mod:`raytimm.checkpoint` and :mod:`raytimm.tracking` can use it without
pulling in torch or mlflow. Credential *values* never need removing from text: they stay in the
environment and the provider chain, and storage errors are built from error codes, never from them.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

# Key fragments that mark a value as secret; matched case-insensitively anywhere in the key name.
SECRET_MARKERS = (
    "secret", "passw", "token", "access_key", "accesskey", "credential", "api_key", "apikey",
    "private_key", "authorization",
)
_USERINFO_RE = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)[^/@\s]+@")


def redact_uri(uri: str) -> str:
    """Replace ``user:password@`` in a URI with ``***@`` so it can be logged."""
    return _USERINFO_RE.sub(r"\g<scheme>***@", str(uri))


def is_secret_key(key: Any) -> bool:
    """Whether a config key names a secret (its value must never be written or logged)."""
    lowered = str(key).lower()
    return any(marker in lowered for marker in SECRET_MARKERS)


def scrub_secrets(value: Any) -> Any:
    """Copy of a config tree (dicts, lists) without secret-looking keys, with URL passwords redacted."""
    if isinstance(value, Mapping):
        return {k: scrub_secrets(v) for k, v in value.items() if not is_secret_key(k)}
    if isinstance(value, (list, tuple)):
        return [scrub_secrets(v) for v in value]
    if isinstance(value, str):
        return redact_uri(value)
    return value

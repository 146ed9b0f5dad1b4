"""Shapes of credentials that must never be committed (cluster.yaml, configs/, deploy/)."""
import re

SECRET_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),                      # AWS access key id
    re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])"),  # AWS secret key shape
    re.compile(r"(?i)(secret|password|passwd|token|access_key|api_key)\s*[:=]\s*['\"]?[A-Za-z0-9/+_\-]{12,}"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{16,}"),           # an Authorization header value
    re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"),       # a JWT
    re.compile(r"\b(gh[pousr]_[A-Za-z0-9]{30,}|xox[abp]-[A-Za-z0-9-]{10,})"),  # GitHub / Slack tokens
    re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{32,}(?![0-9a-fA-F])"),   # a long hex secret (Ray auth tokens)
    re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@"),     # user:password@ in a URL
]

# One leaked example per pattern above, so a test can show that each one still matches something.
LEAKED_EXAMPLES = [
    "aws_access_key_id: AKIAIOSFODNN7EXAMPLE",
    'aws_secret: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"',
    "password: hunter2hunter2hunter2",
    "-----BEGIN RSA PRIVATE KEY-----",
    "Authorization: Bearer abcdefghijklmnop0123",
    "token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0",
    "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
    "RAY_AUTH_TOKEN=0123456789abcdef0123456789abcdef",
    "MLFLOW_TRACKING_URI=https://alice:s3cr3t@mlflow.example.com",
]


def find_secrets(text: str) -> list[str]:
    """The substrings of ``text`` that look like credentials."""
    return [m.group(0) for p in SECRET_PATTERNS for m in p.finditer(text)]

"""Environment variables raytimm reads, and the ones it forwards to Ray workers and Serve replicas.

One list for training workers and Serve replicas alike: Ray processes inherit the driver's
environment only when this process started the local Ray itself (PITFALLS: "Env of workers"),
so on a joined cluster every setting a worker or replica reads must be forwarded explicitly.
Only non-secret values: credentials come from each node's own environment or provider chain.
"""
from __future__ import annotations

import os

WEIGHTS_DIR_ENV = "RAYTIMM_WEIGHTS_DIR"  # folder of <model name>.safetensors pretrained weights
CACHE_DIR_ENV = "RAYTIMM_CACHE_DIR"  # node-local cache root (staged datasets, DICE conversions, weights)
API_TOKEN_ENV = "RAYTIMM_API_TOKEN"  # Bearer token of the HTTP API (a secret: never forwarded in clear)
# A run's storage.endpoint_url / storage.region as storage.configure() set them in this process; carried
# to the Ray workers and Serve replicas it starts like every other forwarded variable (storage/clients.py).
STORAGE_ENDPOINT_ENV = "RAYTIMM_STORAGE_ENDPOINT_URL"
STORAGE_REGION_ENV = "RAYTIMM_STORAGE_REGION"

FORWARDED_ENV = (
    WEIGHTS_DIR_ENV, CACHE_DIR_ENV,
    # Storage endpoints, regions and retry budget (raytimm.storage reads all of them).
    STORAGE_ENDPOINT_ENV, STORAGE_REGION_ENV,
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "R2_ACCOUNT_ID", "R2_ENDPOINT_URL",
    "AWS_MAX_ATTEMPTS",
    "MLFLOW_TRACKING_URI",
    # Quiet progress output and Train's print handling, as the driver chose them.
    "TQDM_DISABLE", "RAY_TRAIN_ENABLE_PRINT_PATCH",
)


def forwarded_env() -> dict[str, str]:
    """The forwarded variables that are set (and non-empty) in this process."""
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}

"""Typed settings of the Serve app (``build_app``'s arguments). No Ray imports."""
from typing import Optional

from pydantic import BaseModel, Field, field_validator

from raytimm.config import ServeSection

APP_NAME = "raytimm"
QUIET_LOGGING = {"enable_access_log": False, "log_level": "WARNING"}
DEFAULTS = ServeSection()


class Secret:
    """Holds a token without ever printing it (repr/str are masked)."""

    def __init__(self, value: Optional[str]):
        self._value = value or None

    def get(self) -> Optional[str]:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)" if self._value else "Secret(None)"

    __str__ = __repr__


class ServeArgs(BaseModel):
    """Arguments of ``build_app`` (``serve run raytimm.serve:build_app checkpoint=URI key=value ...``)."""

    checkpoint: str = Field(description="checkpoint folder, run/tune folder, or legacy .pt (local, s3://, r2://)")
    model_name: Optional[str] = Field(None, description="timm model name (legacy .pt only)")
    num_classes: Optional[int] = Field(None, description="number of classes (legacy .pt only)")
    replicas: int = Field(DEFAULTS.replicas, ge=1, description="model replicas (ignored with autoscaling)")
    max_batch_size: int = Field(DEFAULTS.max_batch_size, ge=1)
    batch_wait_ms: float = Field(DEFAULTS.batch_wait_ms, ge=0)
    max_upload_mb: float = Field(DEFAULTS.max_upload_mb, gt=0)
    max_pixels: int = Field(DEFAULTS.max_pixels, gt=0)
    allow: list = Field(default_factory=list, description="extra allowed checkpoint prefixes")
    allow_checkpoint_root: bool = Field(True, description="also allow the startup checkpoint's storage root")
    max_models: int = Field(DEFAULTS.max_models, ge=1)
    num_cpus: float = Field(DEFAULTS.num_cpus, ge=0, description="CPUs per model replica (= torch threads)")
    num_gpus: float = Field(DEFAULTS.num_gpus, ge=0, description="GPUs per model replica; fractions share a GPU")
    ingress_num_cpus: float = Field(0.1, ge=0)
    ingress_replicas: int = Field(1, ge=1)
    weights_dir: Optional[str] = Field(None, description="pretrained weights folder (default $RAYTIMM_WEIGHTS_DIR)")
    autoscaling: Optional[dict] = Field(None, description="Serve autoscaling_config for the model deployment")

    @field_validator("allow", mode="before")
    @classmethod
    def _split_allow(cls, v):
        # `serve run ... allow=a,b` passes one string.
        if v is None:
            return []
        if isinstance(v, str):
            return [p for p in v.split(",") if p.strip()]
        return list(v)

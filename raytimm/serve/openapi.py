"""The OpenAPI description of the HTTP API: multipart forms, answers and error bodies. No Ray imports.

The routes parse their multipart bodies by hand (to answer 413 before a too-large body is read), so
FastAPI cannot infer the forms; they are described here and attached with ``openapi_extra``, and
every status a route can answer is listed with its JSON body. tests/test_serve_guard.py fuzzes the
running app against this document (schemathesis): an undocumented status or body is a failure.
"""
from typing import Optional, Union

from pydantic import BaseModel, Field

from raytimm.serve.http import MAX_FILES

BEARER = "bearerAuth"


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: one line naming the field, file or URI and what would be right."""

    detail: str


class Health(BaseModel):
    status: str = Field(description="'ok', 'loading' or 'draining'")
    detail: Optional[str] = None


class ClassScore(BaseModel):
    class_id: int
    class_name: str
    confidence: float


class Prediction(BaseModel):
    """The answer for one image."""

    task_type: str = Field(description="'image_classification', or 'multi_label_classification' for a multi-label "
                                       "model (scores are then independent sigmoids, not a softmax)")
    top_k_predictions: list[ClassScore] = Field(description="The top_k scores, highest first")
    predicted_class: str
    confidence: float
    labels: Optional[list[ClassScore]] = Field(None, description="Multi-label models only: every label whose score "
                                                                "reaches its threshold, highest first (may be empty)")


class Predictions(BaseModel):
    """The answer for several images, in upload order."""

    results: list[Prediction]


_ERROR_TEXT = {
    400: "Malformed body or header, or an empty file",
    401: "Missing or wrong bearer token",
    403: "checkpoint_path outside the allowed prefixes",
    404: "Checkpoint, or pretrained weights, not found",
    413: "Body or image too large",
    415: "A file is not a decodable image (the detail names it)",
    422: "A field is missing or invalid, or the model is not allowed or too large",
    502: "Storage error while loading a checkpoint",
    503: "No model loaded yet, or the server is shutting down",
}


def responses(ok: type, *codes: int) -> dict:
    """FastAPI ``responses=``: 200 with ``ok`` (a model or a Union of models) and each error code's ErrorBody."""
    out: dict = {200: {"model": ok, "description": "Success"}}
    for code in codes:
        out[code] = {"model": ErrorBody, "description": _ERROR_TEXT[code]}
    return out


def _form(properties: dict, required: list) -> dict:
    schema = {"type": "object", "properties": properties, "required": required}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}},
            "security": [{BEARER: []}]}


_FILES = {"type": "array", "minItems": 1, "maxItems": MAX_FILES, "items": {"type": "string", "format": "binary"},
          "description": f"Image files (JPEG, PNG, WebP, BMP, TIFF, GIF); the field repeats, at most {MAX_FILES}."}
_TOP_K = {"type": "integer", "minimum": 1, "default": 5, "description": "Predictions per image (clamped to the "
                                                                        "class count)."}

_THRESHOLD = {"type": "number", "minimum": 0, "maximum": 1,
              "description": "Multi-label models only: the score a label needs to be in `labels`, for every label "
                             "(overrides the checkpoint's per-label thresholds for this request). A single-label "
                             "model answers 422."}

PREDICT_FORM = _form({"file": _FILES, "top_k": _TOP_K, "threshold": _THRESHOLD}, ["file"])
PREDICT_FORM["parameters"] = [{"name": "top_k", "in": "query", "required": False, "schema": _TOP_K,
                               "description": "Same as the form field (the form field wins)."}]
QUICK_FORM = _form({
    "file": _FILES, "top_k": _TOP_K, "threshold": _THRESHOLD,
    "checkpoint_path": {"type": "string", "description": "Checkpoint folder, run/tune folder or legacy .pt under an "
                                                         "allowed prefix (local, s3:// or r2://); without it the "
                                                         "pretrained ImageNet model_name is used."},
    "model_name": {"type": "string", "maxLength": 100, "pattern": "^[A-Za-z0-9_.-]+$",
                   "description": "timm model name: required without checkpoint_path (an allowed model with "
                                  "weights), and for a legacy .pt."},
    "num_classes": {"type": "integer", "minimum": 1, "maximum": 9_999_999, "description": "Classes of a legacy .pt."},
    "training_job_id": {"type": "string", "description": "Informational; not used to pick the model."},
}, ["file"])
AUTH_ONLY = {"security": [{BEARER: []}]}

PREDICT_RESPONSES = responses(Union[Prediction, Predictions], 400, 401, 413, 415, 422, 503)
QUICK_RESPONSES = responses(Union[Prediction, Predictions], 400, 401, 403, 404, 413, 415, 422, 502, 503)
MODEL_RESPONSES = responses(dict, 401, 503)
HEALTH_RESPONSES = {200: {"model": Health, "description": "A model is loaded"},
                    503: {"model": Health, "description": "No model replica answered in time, or draining"}}


def with_security_scheme(schema: dict) -> dict:
    """Declare the bearer scheme the secured routes name (the token is optional server-side: no token, no auth)."""
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})[BEARER] = {"type": "http", "scheme": "bearer"}
    return schema

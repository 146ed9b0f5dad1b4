"""Validate Kubernetes objects against a CRD's structural schema, as the API server would on create.

A CRD's ``openAPIV3Schema`` is OpenAPI v3.0 plus Kubernetes extensions that a JSON Schema validator
does not know by itself:

- fields not in ``properties`` are rejected (``kubectl apply`` field validation is Strict) unless
  ``x-kubernetes-preserve-unknown-fields: true`` or ``additionalProperties`` allows them;
- ``x-kubernetes-int-or-string: true``: an integer or a string (quantities such as ``cpu: 4`` or ``"500m"``);
- ``nullable: true`` adds null; ``format: int32/int64`` bound integers;
- ``x-kubernetes-list-type: map`` (items unique by ``x-kubernetes-list-map-keys``) and ``set``;
- ``x-kubernetes-validations``: CEL rules. Those in KubeRay's CRDs are evaluated in Python below;
  any other rule on a field a manifest sets is reported, never skipped.

Any other ``x-kubernetes-*`` key stops the conversion, so a newer CRD cannot be half-checked.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import jsonschema
import yaml

DATA = Path(__file__).resolve().parent / "data" / "kuberay"
CRD_FILES = {"RayJob": DATA / "ray.io_rayjobs.yaml", "RayService": DATA / "ray.io_rayservices.yaml"}

_HANDLED = {"x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-list-type",
            "x-kubernetes-list-map-keys", "x-kubernetes-map-type", "x-kubernetes-validations"}

# ObjectMeta is `type: object` with no properties in a CRD (the API server validates it itself);
# these are the fields a manifest of ours may set, with the API server's name rule (DNS-1123).
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 63, "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def _has(obj: Any, key: str) -> bool:
    return isinstance(obj, dict) and key in obj


# The CEL rules of KubeRay's RayJob/RayService CRDs, as Python, for an object being created
# (so transition rules on oldSelf hold).
CEL_RULES: dict[str, Callable[[Any], bool]] = {
    "self == oldSelf": lambda s: True,
    "self in ['ray.io/kuberay-operator', 'kueue.x-k8s.io/multikueue']":
        lambda s: s in ("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"),
    "!((has(self.onSuccess) || has(self.onFailure)) && has(self.deletionRules))":
        lambda s: not ((_has(s, "onSuccess") or _has(s, "onFailure")) and _has(s, "deletionRules")),
    "((has(self.onSuccess) && has(self.onFailure)) || has(self.deletionRules))":
        lambda s: (_has(s, "onSuccess") and _has(s, "onFailure")) or _has(s, "deletionRules"),
    "!(has(self.jobStatus) && has(self.jobDeploymentStatus))":
        lambda s: not (_has(s, "jobStatus") and _has(s, "jobDeploymentStatus")),
    "has(self.jobStatus) || has(self.jobDeploymentStatus)":
        lambda s: _has(s, "jobStatus") or _has(s, "jobDeploymentStatus"),
}


@functools.lru_cache(maxsize=None)
def load_crd(kind: str) -> dict:
    """The vendored CustomResourceDefinition for a KubeRay kind (read once; treat as read-only)."""
    # libyaml's loader reads the ~1 MB CRDs several times faster than the pure-Python one.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(CRD_FILES[kind], encoding="utf-8") as f:
        return yaml.load(f, Loader=loader)


def to_json_schema(node: Any, path: str = "#") -> Any:
    """A Kubernetes structural schema (one CRD version's openAPIV3Schema) as a strict JSON Schema."""
    if isinstance(node, list):
        return [to_json_schema(item, f"{path}/{i}") for i, item in enumerate(node)]
    if not isinstance(node, dict):
        return node
    unknown = {k for k in node if k.startswith("x-kubernetes-")} - _HANDLED
    if unknown:
        raise NotImplementedError(f"{path}: schema extension(s) {sorted(unknown)} are not handled by this validator")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: to_json_schema(sub, f"{path}/properties/{name}") for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = to_json_schema(value, f"{path}/{key}")
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = to_json_schema(value, f"{path}/{key}")
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    if node.get("type") == "object" and "additionalProperties" not in node and not preserve:
        out["additionalProperties"] = False  # unknown fields are an error, not silently pruned
    return out


def _list_type(validator, list_type, instance, schema):
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        seen = []
        for item in instance:
            if item in seen:
                yield jsonschema.ValidationError(f"duplicate item {item!r} in a list-type=set list")
            seen.append(item)
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        props = schema.get("items", {}).get("properties", {})
        seen = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            ident = tuple(item.get(k, props.get(k, {}).get("default")) for k in keys)
            if ident in seen:
                yield jsonschema.ValidationError(f"duplicate entry {dict(zip(keys, ident))} in a list keyed by {keys}")
            seen.add(ident)


def _cel(validator, rules, instance, schema):
    for rule in rules:
        check = CEL_RULES.get(rule["rule"])
        if check is None:
            yield jsonschema.ValidationError(f"CEL rule {rule['rule']!r} is not evaluated by tests/helpers_kuberay.py; "
                                             "add it to CEL_RULES")
        elif not check(instance):
            yield jsonschema.ValidationError(f"CEL rule failed: {rule.get('message', rule['rule'])}")


def _int_format(bits: int) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        return not isinstance(value, int) or isinstance(value, bool) or -(2 ** (bits - 1)) <= value < 2 ** (bits - 1)
    return check


_FORMATS = jsonschema.FormatChecker(formats=())
_FORMATS.checks("int32")(_int_format(32))
_FORMATS.checks("int64")(_int_format(64))

# OpenAPI v3.0 is closest to JSON Schema draft 4 (boolean exclusiveMaximum, no const).
K8sValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator,
    {"x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel},
)


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str, version: str):
    """A validator for objects of one served version of a KubeRay CRD (metadata checked as ObjectMeta)."""
    crd = load_crd(kind)
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v.get("served")]
    schema = to_json_schema(entry["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    return K8sValidator(schema, format_checker=_FORMATS)


def manifest_errors(doc: dict) -> list[str]:
    """Every reason the API server with KubeRay's CRDs would refuse this object; empty when valid."""
    kind = doc.get("kind")
    if kind not in CRD_FILES:
        return [f"kind {kind!r} is not one of {sorted(CRD_FILES)}"]
    crd = load_crd(kind)
    group, _, version = str(doc.get("apiVersion", "")).partition("/")
    served = [v["name"] for v in crd["spec"]["versions"] if v.get("served")]
    if group != crd["spec"]["group"] or version not in served:
        return [f"apiVersion {doc.get('apiVersion')!r}: expected {crd['spec']['group']}/<one of {served}>"]
    if "status" in doc:
        return ["status is written by the operator, not by a manifest"]
    errors = sorted(crd_validator(kind, version).iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in errors]


# ----------------------------------------------------------------------------- Ray pods

def cluster_specs(doc: dict) -> list[dict]:
    """The RayCluster spec(s) a RayJob or RayService creates."""
    spec = doc["spec"]
    return [s for s in (spec.get("rayClusterSpec"), spec.get("rayClusterConfig")) if s]


def pod_groups(cluster: dict) -> Iterator[tuple[str, dict]]:
    """("head" | worker group name, group spec) for the head and every worker group."""
    yield "head", cluster["headGroupSpec"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group


def containers(doc: dict) -> Iterator[tuple[str, dict]]:
    """(where, container) for every container and init container the manifest defines."""
    pod_templates = [(name, g["template"]) for c in cluster_specs(doc) for name, g in pod_groups(c)]
    if doc["spec"].get("submitterPodTemplate"):
        pod_templates.append(("submitter", doc["spec"]["submitterPodTemplate"]))
    for name, template in pod_templates:
        for key in ("initContainers", "containers"):
            for c in template["spec"].get(key, []):
                yield f"{name}/{c['name']}", c


_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?$")
_SUFFIX = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "Pi": 2 ** 50, "Ei": 2 ** 60}


def quantity(value: int | float | str) -> float:
    """A Kubernetes quantity (``4``, ``"500m"``, ``"16Gi"``) as a number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = _QUANTITY.match(str(value))
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    return float(match[1]) * _SUFFIX[match[2]]


def ray_resources(group: dict) -> dict[str, float]:
    """The Ray resources one pod of a group advertises, as KubeRay derives them (limits, rayStartParams)."""
    container = group["template"]["spec"]["containers"][0]
    limits = {**container.get("resources", {}).get("requests", {}), **container.get("resources", {}).get("limits", {})}
    out = {"CPU": quantity(limits.get("cpu", 0)), "GPU": quantity(limits.get("nvidia.com/gpu", 0)),
           "memory": quantity(limits.get("memory", 0))}
    params = group.get("rayStartParams", {})
    if "num-cpus" in params:
        out["CPU"] = float(params["num-cpus"])
    if "num-gpus" in params:
        out["GPU"] = float(params["num-gpus"])
    return out


def slots(pod: dict[str, float], demand: dict[str, float]) -> int:
    """How many actors needing ``demand`` fit on one pod with ``pod`` resources."""
    fits = [int(pod.get(k, 0.0) / v + 1e-9) for k, v in demand.items() if v > 0]
    return min(fits) if fits else 0

"""deploy/kuberay/*.yaml, deploy/Dockerfile and .dockerignore: valid for KubeRay's CRDs (tests/data/kuberay),
Ray's Serve schema and raytimm's CLI, config and serve arguments; credentials only from Secrets.

No Ray cluster and no network: configs are loaded with sockets blocked.
"""
import copy
import hashlib
import importlib
import os
import re
import shlex
import socket
import typing
from pathlib import Path

import pydantic
import pytest
import ray
import yaml
from packaging.requirements import Requirement

from raytimm import storage
from raytimm.cli import build_parser
from raytimm.config import load_config
from raytimm.secrets import is_secret_key
from tests.helpers_kuberay import (DATA, cluster_specs, containers, manifest_errors, pod_groups, quantity,
                                   ray_resources, slots)
from tests.helpers_secrets import find_secrets

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "kuberay").glob("*.yaml"))
DOCKERFILE = DEPLOY / "Dockerfile"
# Resident memory a model replica may need: 1661 MiB peak measured for vit_base_patch16_224 after a
# batch of 16 on CPU, plus up to max_models cached models (deploy/kuberay/rayservice.yaml).
REPLICA_MEMORY_GIB = 3.0
# Ray containers must carry these credentials, each from a Secret.
STORAGE_CREDENTIALS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
AUTH = {"mode": "token", "secretName": "raytimm-ray-auth"}


def serve_settings(args: dict) -> dict:
    """The RayService app's ``args`` checked by raytimm's typed serve arguments, as plain values.

    The one place that names raytimm.serve's API: when the settings model moves or is renamed, only
    this function changes.
    """
    from raytimm.serve import Ingress, ModelServer, ServeArgs

    unknown = sorted(set(args) - set(ServeArgs.model_fields))
    assert not unknown, f"serveConfigV2 args: unknown key(s) {unknown} for ServeArgs"
    a = ServeArgs.model_validate(args)
    return {"checkpoint": a.checkpoint, "num_cpus": a.num_cpus, "num_gpus": a.num_gpus,
            "ingress_num_cpus": a.ingress_num_cpus, "ingress_replicas": a.ingress_replicas,
            "model_deployment": ModelServer.name, "deployments": {ModelServer.name, Ingress.name}}


# ----------------------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def docs() -> dict:
    return {p.name: yaml.safe_load(p.read_text(encoding="utf-8")) for p in MANIFESTS}


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (config loading must stay offline)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access while loading a config: {args!r}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _jobs(docs: dict) -> dict:
    return {name: d for name, d in docs.items() if d["kind"] == "RayJob"}


def _service(docs: dict) -> dict:
    (doc,) = [d for d in docs.values() if d["kind"] == "RayService"]
    return doc


def _workers(cluster: dict) -> list[dict]:
    return cluster.get("workerGroupSpecs", [])


def job_command(doc: dict):
    """The RayJob entrypoint parsed by raytimm's own CLI parser."""
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "raytimm", doc["spec"]["entrypoint"]
    return build_parser().parse_args(argv[1:])


def job_config(doc: dict):
    """The config a RayJob's entrypoint runs with (its --config is relative to the job's working_dir,
    which is the image's copy of this repository's configs/)."""
    args = job_command(doc)
    working_dir = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["working_dir"]
    assert working_dir == dockerfile_value("WORKDIR"), "runtime_env working_dir must be the image's WORKDIR"
    assert not os.path.isabs(args.config), "--config is resolved in the job's working_dir"
    return load_config(ROOT / args.config, args.overrides)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, rest = line.partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


def dockerfile_value(instr: str) -> str:
    """The argument of the last ``instr`` in deploy/Dockerfile."""
    values = [rest for i, rest in dockerfile_instructions() if i == instr]
    assert values, f"deploy/Dockerfile has no {instr}"
    return values[-1]


def dockerfile_vars(instr: str) -> dict[str, str]:
    """NAME=value pairs of every ARG or ENV."""
    out = {}
    for i, rest in dockerfile_instructions():
        if i == instr:
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                out[name] = value
    return out


def credential_problems(doc: dict) -> list[str]:
    """Every way a manifest could carry a credential other than through a Kubernetes Secret."""
    problems = []
    for where, c in containers(doc):
        for e in c.get("env", []):
            secret = e.get("valueFrom", {}).get("secretKeyRef")
            if is_secret_key(e["name"]) and (secret is None or "value" in e):
                problems.append(f"{where}: {e['name']} must come from a secretKeyRef, not a literal or another source")
            if e["name"] == "RAY_AUTH_MODE" and e.get("value") != "token":
                problems.append(f"{where}: RAY_AUTH_MODE={e.get('value')!r}: token authentication must stay on")
        for src in c.get("envFrom", []):
            if set(src) - {"configMapRef", "secretRef", "prefix"}:
                problems.append(f"{where}: envFrom {src} is neither a ConfigMap nor a Secret")
        names = {e["name"] for e in c.get("env", [])}
        missing = STORAGE_CREDENTIALS - names
        if missing and not any("secretRef" in s for s in c.get("envFrom", [])):
            problems.append(f"{where}: no {sorted(missing)} from a Secret: R2 would be unreachable")
    return problems


def _models_in(annotation) -> list[type]:
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def unknown_keys(model: type, data, path: str) -> list[str]:
    """Keys in ``data`` that ``model`` (a pydantic schema that ignores extras) would silently drop."""
    if not isinstance(data, dict):
        return []
    fields = model.model_fields
    out = [f"{path}.{k}" for k in data if k not in fields]
    for name, value in data.items():
        models = _models_in(fields[name].annotation) if name in fields else []
        if len(models) != 1:
            continue
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            out += unknown_keys(models[0], item, f"{path}.{name}" + (f"[{i}]" if isinstance(value, list) else ""))
    return out


def serve_config(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def serve_problems(config: dict) -> list[str]:
    """Reasons `serve deploy` would reject this config or silently ignore part of it."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(config)
    except pydantic.ValidationError as e:
        return [str(e)]
    problems = unknown_keys(ServeDeploySchema, config, "serveConfigV2")
    for app in config["applications"]:
        for dep in app.get("deployments", []):
            if dep.get("autoscaling_config"):
                problems += unknown_keys(AutoscalingConfig, dep["autoscaling_config"], f"{dep['name']}.autoscaling_config")
                AutoscalingConfig.model_validate(dep["autoscaling_config"])  # min <= max and friends
    return problems


# ----------------------------------------------------------------------------- CRD schemas

@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_for_kuberays_crd(path):
    assert manifest_errors(yaml.safe_load(path.read_text(encoding="utf-8"))) == []


def test_there_are_the_three_manifests(docs):
    assert {(n, d["kind"]) for n, d in docs.items()} == {
        ("rayjob-train.yaml", "RayJob"), ("rayjob-tune.yaml", "RayJob"), ("rayservice.yaml", "RayService")}


def _head(doc):
    return cluster_specs(doc)[0]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _worker(doc):
    return _workers(cluster_specs(doc)[0])[0]


BROKEN = [
    ("unknown container field", lambda d: _head(d).update(imagePullPolcy="Always"), "imagePullPolcy"),
    ("unknown spec field", lambda d: d["spec"].update(shutdownAfterJobFinish=True), "shutdownAfterJobFinish"),
    ("unknown metadata field", lambda d: d["metadata"].update(lables={"a": "b"}), "lables"),
    ("replicas not an integer", lambda d: _worker(d).update(replicas="two"), "'two' is not of type 'integer'"),
    ("int32 out of range", lambda d: _worker(d).update(maxReplicas=2 ** 31), "int32"),
    ("quantity a list", lambda d: _head(d)["resources"]["limits"].update(cpu=[4]), "cpu"),
    ("quantity a float", lambda d: _head(d)["resources"]["limits"].update(cpu=0.5), "cpu"),
    ("quantity not a quantity", lambda d: _head(d)["resources"]["limits"].update(memory="16 GB"), "does not match"),
    ("rayStartParams value not a string", lambda d: cluster_specs(d)[0]["headGroupSpec"]["rayStartParams"]
     .update({"num-cpus": 0}), "num-cpus"),
    ("duplicate env name (list-type map)", lambda d: _head(d)["env"].append({"name": "AWS_ACCESS_KEY_ID", "value": "x"}),
     "duplicate entry"),
    ("enum", lambda d: cluster_specs(d)[0]["authOptions"].update(mode="password"), "'password' is not one of"),
    ("CEL rule", lambda d: d["spec"].update(managedBy="someone-else"), "CEL rule failed"),
    ("wrong apiVersion", lambda d: d.update(apiVersion="ray.io/v2"), "apiVersion"),
    ("status in a manifest", lambda d: d.update(status={}), "status"),
    ("bad name", lambda d: d["metadata"].update(name="Raytimm_Train"), "does not match"),
]


@pytest.mark.parametrize("mutate, expected", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_schema_check_rejects_a_broken_manifest(docs, mutate, expected):
    doc = copy.deepcopy(docs["rayjob-train.yaml"])
    mutate(doc)
    errors = manifest_errors(doc)
    assert any(expected in e for e in errors), errors


def test_quantities_may_be_integers_or_strings(docs):
    for cpu in (4, "4", "3500m"):
        doc = copy.deepcopy(docs["rayservice.yaml"])
        _head(doc)["resources"]["limits"]["cpu"] = cpu
        assert manifest_errors(doc) == [], cpu
    assert quantity("500m") == 0.5 and quantity("16Gi") == 16 * 2 ** 30 and quantity(4) == 4


# ----------------------------------------------------------------------------- RayJobs

@pytest.mark.parametrize("name, command", [("rayjob-train.yaml", "train"), ("rayjob-tune.yaml", "tune")])
def test_entrypoint_is_a_raytimm_command_whose_config_loads_offline(docs, no_network, name, command):
    doc = docs[name]
    assert job_command(doc).command == command
    cfg = job_config(doc)
    for uri in (cfg.data.path, cfg.storage.path):
        assert storage.parse_uri(uri).scheme == "r2", uri
    if command == "tune":
        assert cfg.tune.search_space, "a sweep needs a search space"


def test_train_job_uses_exactly_its_gpu_workers(docs, no_network):
    doc = docs["rayjob-train.yaml"]
    cfg = job_config(doc)
    cluster = cluster_specs(doc)[0]
    # "auto" would depend on whether GPU pods had joined when the driver looked.
    assert cfg.scaling.use_gpu is True
    per_worker = {"CPU": cfg.scaling.cpus_per_worker or 1, "GPU": cfg.scaling.gpus_per_worker}
    groups = _workers(cluster)
    for g in groups:
        assert g["minReplicas"] == g["replicas"] == g["maxReplicas"], "training needs a fixed set of GPUs"
    capacity = sum(g["replicas"] * slots(ray_resources(g), per_worker) for g in groups)
    gpus = sum(g["replicas"] * ray_resources(g)["GPU"] for g in groups)
    assert capacity >= cfg.scaling.num_workers
    assert gpus == cfg.scaling.num_workers * cfg.scaling.gpus_per_worker, "GPUs that no Train worker uses"


def test_tune_job_starts_with_one_trial_and_grows_to_max_concurrent(docs, no_network):
    doc = docs["rayjob-tune.yaml"]
    cfg = job_config(doc)
    cluster = cluster_specs(doc)[0]
    assert cfg.scaling.use_gpu is True and cluster["enableInTreeAutoscaling"] is True
    per_worker = {"CPU": cfg.scaling.cpus_per_worker or 1, "GPU": cfg.scaling.gpus_per_worker}
    groups = _workers(cluster)
    at_start = sum(g["replicas"] * slots(ray_resources(g), per_worker) for g in groups)
    at_most = sum(g["maxReplicas"] * slots(ray_resources(g), per_worker) for g in groups)
    # raytimm tune refuses to start when not even one trial fits the cluster it finds.
    assert at_start >= cfg.scaling.num_workers
    assert cfg.tune.max_concurrent_trials, "without it the sweep sizes itself to the starting cluster"
    assert at_most == cfg.tune.max_concurrent_trials * cfg.scaling.num_workers


@pytest.mark.parametrize("name", ["rayjob-train.yaml", "rayjob-tune.yaml"])
def test_job_frees_its_cluster_and_a_retry_resumes(docs, no_network, name):
    spec = docs[name]["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 1
    cfg = job_config(docs[name])
    # A retry submits the same command; a fixed run/sweep name makes it resume, not start over.
    assert (cfg.run.name if job_command(docs[name]).command == "train" else cfg.tune.name)


@pytest.mark.parametrize("name", ["rayjob-train.yaml", "rayjob-tune.yaml", "rayservice.yaml"])
def test_head_is_cpu_only_and_runs_no_work(docs, name):
    head = cluster_specs(docs[name])[0]["headGroupSpec"]
    assert ray_resources(head)["GPU"] == 0 and ray_resources(head)["CPU"] == 0
    assert "nvidia.com/gpu" not in str(head["template"]["spec"]["containers"][0]["resources"])


# ----------------------------------------------------------------------------- RayService

def test_serve_config_is_a_serve_deploy_config_without_ignored_keys(docs):
    assert serve_problems(serve_config(_service(docs))) == []


def test_serve_config_check_catches_keys_serve_would_ignore(docs):
    config = serve_config(_service(docs))
    dep = config["applications"][0]["deployments"][0]
    dep["autoscaling_confg"] = dep.pop("autoscaling_config")
    assert any("autoscaling_confg" in p for p in serve_problems(config))
    config = serve_config(_service(docs))
    config["applications"][0]["deployments"][0]["autoscaling_config"]["max_replica"] = 3
    assert any("max_replica" in p for p in serve_problems(config))
    config = serve_config(_service(docs))
    config["applications"][0]["import_pth"] = config["applications"][0].pop("import_path")
    assert serve_problems(config)


def test_serve_args_are_raytimms_serve_arguments(docs):
    (app,) = serve_config(_service(docs))["applications"]
    settings = serve_settings(app["args"])
    module, _, attr = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    names = {d["name"] for d in app["deployments"]}
    assert names <= settings["deployments"], names - settings["deployments"]
    (scaled,) = [d for d in app["deployments"] if "autoscaling_config" in d]
    assert scaled["name"] == settings["model_deployment"]
    with pytest.raises(AssertionError, match="max_bach_size"):
        serve_settings({**app["args"], "max_bach_size": 8})
    with pytest.raises(pydantic.ValidationError):
        serve_settings({**app["args"], "max_batch_size": 0})


def test_served_checkpoint_is_the_trained_run(docs, no_network):
    (app,) = serve_config(_service(docs))["applications"]
    cfg = job_config(docs["rayjob-train.yaml"])
    assert serve_settings(app["args"])["checkpoint"] == storage.join(cfg.storage.path, cfg.run.name)


def test_serve_replicas_fit_the_worker_group(docs):
    doc = _service(docs)
    (app,) = serve_config(doc)["applications"]
    s = serve_settings(app["args"])
    scaling = next(d for d in app["deployments"] if d["name"] == s["model_deployment"])["autoscaling_config"]
    (group,) = _workers(cluster_specs(doc)[0])
    pod = ray_resources(group)
    model = {"CPU": s["num_cpus"], "GPU": s["num_gpus"]}
    ingress = {"CPU": s["ingress_num_cpus"]}

    def model_replicas(pods: int) -> int:
        # Ingress replicas first, spread one per pod, then as many model replicas as still fit.
        spread = [s["ingress_replicas"] // pods + (i < s["ingress_replicas"] % pods) for i in range(pods)]
        return sum(slots({**pod, "CPU": pod["CPU"] - n * ingress["CPU"]}, model) for n in spread)

    assert model_replicas(group["replicas"]) >= scaling["min_replicas"]
    assert model_replicas(group["maxReplicas"]) >= scaling["max_replicas"]
    per_replica = pod["memory"] / slots(pod, model) / 2 ** 30
    assert per_replica >= REPLICA_MEMORY_GIB, f"{per_replica:.1f} GiB per model replica"


def test_serve_port_service_and_health_checks(docs):
    doc = _service(docs)
    port = serve_config(doc)["http_options"]["port"]
    assert serve_config(doc)["http_options"]["host"] == "0.0.0.0"  # reachable from the Service
    assert port == 8000
    (svc_port,) = doc["spec"]["serveService"]["spec"]["ports"]
    assert svc_port == {"name": "serve", "port": port}
    cluster = cluster_specs(doc)[0]
    for _, group in pod_groups(cluster):
        ray_container = group["template"]["spec"]["containers"][0]
        assert {"name": "serve", "containerPort": port} in ray_container["ports"]
        # Liveness stays KubeRay's raylet check: a model that loads slowly must not restart pods.
        assert "livenessProbe" not in ray_container
    for group in _workers(cluster):
        probe = " ".join(group["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["command"])
        for url in ("localhost:52365/api/healthz", f"localhost:{port}/-/healthz", f"localhost:{port}/healthz"):
            assert url in probe, url
    assert cluster["enableInTreeAutoscaling"] is True


# ----------------------------------------------------------------------------- credentials, auth

@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_credentials_come_only_from_secrets(docs, path):
    doc = docs[path.name]
    assert credential_problems(doc) == []
    for cluster in cluster_specs(doc):
        assert cluster["authOptions"] == AUTH, "Ray token authentication stays on"
    for where, c in containers(doc):
        assert {"configMapRef": {"name": "raytimm-env"}} in c.get("envFrom", []), f"{where}: R2_ACCOUNT_ID source"
        if doc["kind"] == "RayService":
            token = next(e for e in c["env"] if e["name"] == "RAYTIMM_API_TOKEN")
            assert token["valueFrom"]["secretKeyRef"]["name"] == "raytimm-api", where


def test_credential_check_catches_a_literal_key(docs):
    for bad in ({"name": "AWS_SECRET_ACCESS_KEY", "value": "not-a-secret-ref"},
                {"name": "RAY_AUTH_MODE", "value": "disabled"},
                {"name": "MLFLOW_TRACKING_PASSWORD", "valueFrom": {"configMapKeyRef": {"name": "x", "key": "y"}}}):
        doc = copy.deepcopy(docs["rayjob-tune.yaml"])
        _worker(doc)["template"]["spec"]["containers"][0]["env"] = [bad]
        assert credential_problems(doc), bad


def test_no_literal_secret_in_deploy_configs_or_cluster_yaml():
    files = [ROOT / "cluster.yaml", ROOT / ".dockerignore", *(ROOT / "configs").rglob("*"), *DEPLOY.rglob("*")]
    found = {str(f.relative_to(ROOT)): find_secrets(f.read_text(encoding="utf-8")) for f in files if f.is_file()}
    assert {f: hits for f, hits in found.items() if hits} == {}
    assert len(found) >= 8  # the glob did find the files


# ----------------------------------------------------------------------------- image and versions

def test_image_and_ray_versions_agree(docs):
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M)[1]
    ray_req = next(Requirement(r) for r in re.findall(r'"(ray\[[^"]+)"', pyproject))
    base = dockerfile_value("FROM")
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert dockerfile_vars("ARG")["RAY_VERSION"] == ray.__version__
    assert ray_req.specifier.contains(ray.__version__)
    images = set()
    for doc in docs.values():
        for cluster in cluster_specs(doc):
            assert cluster["rayVersion"] == ray.__version__
        images |= {c["image"] for _, c in containers(doc)}
    (image,) = images
    assert image.endswith(f"/raytimm:{version}"), image


def test_dockerfile_installs_raytimm_as_the_ray_user(docs, no_network):
    instructions = dockerfile_instructions()
    users = [rest for i, rest in instructions if i == "USER"]
    assert users and users[-1] not in ("root", "0")
    runs = " ".join(rest for i, rest in instructions if i == "RUN")
    assert re.search(r"pip install --no-cache-dir \. ", runs) and "[dev]" not in runs
    copies = [rest for i, rest in instructions if i == "COPY"]
    assert any(c.endswith("configs ./configs") for c in copies)
    # The cache volume: ENV, the manifests' mount, and where training's data.cache_dir points.
    cache = dockerfile_vars("ENV")["RAYTIMM_CACHE_DIR"]
    for doc in docs.values():
        for where, c in containers(doc):
            assert {"name": "raytimm-cache", "mountPath": cache} in c["volumeMounts"], where
    cfg = job_config(docs["rayjob-train.yaml"])
    home = str(Path(dockerfile_value("WORKDIR")).parent)  # /home/ray
    assert cfg.data.cache_dir.replace("~", home, 1) == cache


def _docker_ignored(path: str, patterns: list[str]) -> bool:
    # Docker matches patterns against the path from the context root (and its parent folders).
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        if pattern.startswith("**/"):
            if any(re.fullmatch(_glob(pattern[3:]), p) for p in parts):
                return True
        elif any(re.fullmatch(_glob(pattern), p) for p in prefixes):
            return True
    return False


def _glob(pattern: str) -> str:
    return "".join("[^/]*" if ch == "*" else re.escape(ch) for ch in pattern)


def test_dockerignore_keeps_bulk_out_and_the_package_in():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    for path in (".venv/bin/python", "runs/x/best", "data/demo/a.png", "mlflow.db", ".git/HEAD"):
        assert _docker_ignored(path, patterns), path
    copied = ["pyproject.toml", "README.md", *(str(p.relative_to(ROOT)) for d in ("raytimm", "configs")
                                               for p in (ROOT / d).rglob("*.py*") if "__pycache__" not in p.parts)]
    copied += [str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")]
    assert "raytimm/data/images.py" in copied
    assert [p for p in copied if _docker_ignored(p, patterns)] == []


def test_vendored_crds_are_the_unmodified_copies():
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    assert "feeaf72facab4881ba2b179248bb67315634e229" in readme and "Apache" in readme
    assert "Apache License" in (DATA / "LICENSE").read_text(encoding="utf-8")
    for name in ("ray.io_rayjobs.yaml", "ray.io_rayservices.yaml"):
        digest = hashlib.sha256((DATA / name).read_bytes()).hexdigest()
        assert f"{digest}  {name}" in readme, name

"""cluster.yaml is a valid Ray cluster launcher config for the installed Ray, with no secrets."""
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from tests.helpers_secrets import LEAKED_EXAMPLES, SECRET_PATTERNS

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_matches_installed_ray_schema(config):
    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    jsonschema.validate(config, json.loads(schema_path.read_text()))


def test_passes_rays_own_validation(config):
    # Ray's validator adds cross-field checks (head type exists, min_workers <= max_workers).
    from ray.autoscaler._private.util import validate_config

    validate_config(config)


def test_head_is_cpu_and_a_gpu_worker_type_exists(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "GPU" not in head["resources"]
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no worker type advertises a GPU"
    for node_type in gpu_types.values():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"]


def test_docker_image_matches_installed_ray(config):
    image = config["docker"]["image"]
    match = re.fullmatch(r"rayproject/ray(?:-ml)?:(?P<version>[\d.]+)-py(?P<py>\d+)(?:-(?:gpu|cu\d+))?", image)
    assert match, f"unexpected image name {image!r}"
    assert match["version"] == ray.__version__
    # Ray pinned in setup_commands must be the image's version, or pip would replace it.
    pins = re.findall(r"ray\[[^\]]*\]==([\d.]+)", " ".join(config["setup_commands"]))
    assert pins == [ray.__version__]


def test_installs_raytimm_from_the_mounted_repo(config):
    (remote,) = [r for r, local in config["file_mounts"].items() if local == "."]
    assert any(f"-e {remote}" in cmd for cmd in config["setup_commands"])
    assert ".gitignore" in config["rsync_filter"]  # never ship .venv/, runs/ or data


def test_no_secrets_inline():
    text = CLUSTER_YAML.read_text()
    for pattern in SECRET_PATTERNS:
        assert not pattern.search(text), f"cluster.yaml matches secret pattern {pattern.pattern!r}"


def test_secret_patterns_do_catch_secrets():
    # Guard against patterns that can never match: each one finds its own leaked example.
    for pattern, leaked in zip(SECRET_PATTERNS, LEAKED_EXAMPLES, strict=True):
        assert pattern.search(leaked), pattern.pattern

"""The README's curl examples, run verbatim (port swapped) against a real `raytimm serve`."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers_net import free_port
from tests.helpers_serve import raytimm_serve

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.serve, pytest.mark.e2e, pytest.mark.slow]



def readme_curl_commands(marker: str = "curl-examples") -> list[str]:
    """The shell commands between ``<!-- MARKER:start -->`` and its end, continuation lines joined."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(rf"<!-- {marker}:start -->\s*```bash\n(.*?)```", text, re.S)
    assert block, f"README.md lost its {marker} block"
    commands, current = [], ""
    for line in block.group(1).splitlines():
        current += line.rstrip("\\").rstrip() + " "
        if not line.rstrip().endswith("\\"):
            commands.append(current.strip())
            current = ""
    return [c for c in commands if c]


def test_readme_has_both_endpoints():
    cmds = readme_curl_commands()
    assert any("/predict" in c for c in cmds) and any("/inference/quick" in c for c in cmds)


@pytest.fixture(scope="module")
def quickstart_tree(tmp_path_factory):
    """The README's layout: data/demo and runs/quickstart, trained in-process (small and quick)."""
    from raytimm.config import load_config
    from raytimm.data.demo import make_demo_dataset
    from raytimm.engine import fit

    work = tmp_path_factory.mktemp("readme")
    make_demo_dataset(str(work / "data" / "demo"), classes=4, per_class=12, size=48, seed=0)
    cfg = load_config(ROOT / "configs" / "quickstart.yaml",
                      [f"data.path={work / 'data' / 'demo'}", f"storage.path={work / 'runs'}", "run.name=quickstart",
                       "train.epochs=1", "mlflow.enabled=false", "scaling.num_workers=1"])
    fit(cfg, num_threads=2)
    assert (work / "runs" / "quickstart" / "best").exists()
    return work


@pytest.fixture(scope="module")
def served(quickstart_tree):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYTIMM_API_TOKEN")}
    with raytimm_serve(["--checkpoint", "runs/quickstart", "--num-cpus", "0.5"], port=port, cwd=quickstart_tree,
                       env=env):
        yield port


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_curl_examples_work(served, quickstart_tree):
    outputs = []
    for cmd in readme_curl_commands():
        cmd = cmd.replace("127.0.0.1:8000", f"127.0.0.1:{served}")
        r = subprocess.run(["bash", "-c", cmd + " -w '\\n%{http_code}'"], cwd=quickstart_tree, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, (cmd, r.stderr)
        body, _, code = r.stdout.rpartition("\n")
        assert code == "200", (cmd, code, body)
        outputs.append((cmd, json.loads(body)))
    by_route = {re.search(r"/(predict|inference/quick|healthz|model)\b", c).group(1): out for c, out in outputs}
    for route in ("predict", "inference/quick"):
        out = by_route[route]
        assert out["task_type"] == "image_classification"
        assert len(out["top_k_predictions"]) == 3
        assert out["predicted_class"] == out["top_k_predictions"][0]["class_name"]
        assert out["top_k_predictions"][0]["class_name"] in {"circle_red", "cross_orange", "square_blue",
                                                             "triangle_green"}
    assert by_route["model"]["class_names"] == ["circle_red", "cross_orange", "square_blue", "triangle_green"]

"""benchmarks/gpu_check.py --dry-run: every step of the prepared GPU check runs on CPU with tiny sizes.

Nothing is timed here: the test checks that the JSON has every section, each without an error,
so the script is known to work before a scarce GPU window is spent on it.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.serve
def test_gpu_check_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] is True
    for section in ("env", "tests", "train", "serve"):
        assert section in result and "error" not in result[section], (section, result.get(section))
    assert result["tests"]["returncode"] in (0, 5), result["tests"]  # everything skips on CPU (5: none selected)
    runs = result["train"]["runs"]
    for key in ("a", "b", "c"):
        assert runs[key]["img_s"] > 0 and len(runs[key]["rates"]) == result["train"]["epochs"], runs[key]
    assert "skipped" in runs["d"]
    assert set(result["train"]["ratios"]) == {"b/a", "c/a"}
    serve = result["serve"]
    assert set(serve["backends"]) == {"torch", "onnx"}
    assert {b: v["server"]["backend"] for b, v in serve["backends"].items()} == {"torch": "torch", "onnx": "onnx"}
    for v in serve["backends"].values():
        assert all(level["requests"] > 0 and level["errors"] == 0 for level in v["levels"])
    assert "onnx_over_torch" in serve["ratios"][-1] and serve["rebuild_floor_rps"] > 0
    assert "gpu check (dry run, CPU)" in proc.stdout

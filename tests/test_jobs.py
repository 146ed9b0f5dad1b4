"""The training API without Ray: request checks, run config, entrypoint, job registry, status view, the page's files.

The HTTP + Ray Jobs side runs against a real `ray start --head` in tests/test_training_api.py.
"""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from raytimm import jobs, runs
from raytimm.config import load_config
from raytimm.errors import ConfigError
from raytimm.platform_request import REQUEST_FIELDS, load_training_request
from raytimm.serve import page
from raytimm.serve.http import HTTPError
from raytimm.serve.settings import ServeArgs, ServeSettings, check_training_api, is_loopback, settings_from_cli

ROOT = Path(__file__).resolve().parents[1]


def request(data_dir, **change):
    req = {"training_job_id": 42, "project_id": 7, "framework": "timm", "model_name": "resnet18",
           "dataset_path": str(data_dir), "epochs": 3, "batch_size": 8, "learning_rate": 0.01, "img_size": 32}
    req.update(change)
    return {k: v for k, v in req.items() if v is not None}


@pytest.fixture
def data(tmp_path):
    d = tmp_path / "data" / "demo"
    d.mkdir(parents=True)
    return d


def _status(fn, *args, **kwargs):
    with pytest.raises(HTTPError) as ei:
        fn(*args, **kwargs)
    return ei.value.status, ei.value.detail


def test_request_model_has_exactly_the_fields_train_request_maps():
    assert set(jobs.TrainingRequest.model_fields) == set(REQUEST_FIELDS)


def test_prepare_maps_the_request_like_train_request_and_forces_the_runs_storage(data, tmp_path):
    base = {"scaling": {"num_workers": 1}, "mlflow": {"enabled": False}, "storage": {"path": "/elsewhere"}}
    req, cfg = jobs.prepare(request(data), allow_data=[str(tmp_path / "data")], runs_storage=str(tmp_path / "runs"),
                            base=base)
    assert req["training_job_id"] == 42 and req["project_id"] == 7
    assert cfg.run.name == "job_42" and cfg.mlflow.experiment == "project_7"
    assert (cfg.model.name, cfg.model.img_size, cfg.train.epochs, cfg.train.batch_size, cfg.train.lr) == \
        ("resnet18", 32, 3, 8, 0.01)
    assert cfg.storage.path == str(tmp_path / "runs")  # the server decides where runs go, not the base config
    assert cfg.scaling.num_workers == 1 and cfg.mlflow.enabled is False  # the base config's defaults stay
    # The same request through `raytimm train --request` gives the same training settings.
    path = tmp_path / "req.json"
    path.write_text(json.dumps(request(data)))
    cli = load_training_request(path)
    assert (cli.run.name, cli.model.name, cli.train.epochs, cli.train.lr, cli.data.path) == \
        (cfg.run.name, cfg.model.name, cfg.train.epochs, cfg.train.lr, cfg.data.path)


@pytest.mark.parametrize("change,needle", [
    ({"modelname": "x"}, "unknown key 'modelname' (did you mean 'model_name'?)"),
    ({"epochs": "3"}, "epochs='3' has the wrong type: expected an integer"),
    ({"epochs": True}, "epochs=True has the wrong type"),
    ({"epochs": 2.0}, "epochs=2.0 has the wrong type"),
    ({"epochs": 0}, "epochs=0 is out of range"),
    ({"learning_rate": "fast"}, "learning_rate='fast' has the wrong type"),
    ({"learning_rate": -1}, "learning_rate=-1 is out of range"),
    ({"framework": "ultralytics"}, "framework='ultralytics' is invalid: raytimm trains 'timm' models only"),
    ({"dataset_path": 5}, "dataset_path=5 has the wrong type: expected a string"),
    ({"model_name": None}, "model_name is required"),
    ({"training_job_id": "../x"}, "training_job_id='../x' is invalid"),
    ({"training_job_id": "1; touch /tmp/x"}, "training_job_id='1; touch /tmp/x' is invalid"),
    ({"training_job_id": -1}, "training_job_id=-1 is invalid"),
    ({"training_job_id": 1.5}, "training_job_id=1.5 is invalid: expected an integer or a string"),
    ({"project_id": "a\nb"}, "project_id='a\\nb' is invalid"),
    ({"dataset_format": "coco"}, "dataset_format='coco' is not allowed"),
    ({"model_name": "not_a_model_xyz"}, "model_name 'not_a_model_xyz' is not a timm model"),
])
def test_bad_requests_are_422_naming_the_field(data, change, needle):
    status, detail = _status(jobs.prepare, request(data, **change), allow_data=[str(data)], runs_storage="/runs")
    assert status == 422 and needle in detail, detail


@pytest.mark.parametrize("body", [[1, 2], "x", None, 3])
def test_a_body_that_is_not_an_object_is_422(body):
    assert _status(jobs.parse_request, body)[0] == 422


def test_shell_metacharacters_in_a_text_field_are_kept_literally(data, tmp_path):
    req, cfg = jobs.prepare(request(data, project_id="1; touch /tmp/pwned $(id) `id`"), allow_data=[str(data)],
                            runs_storage=str(tmp_path / "runs"))
    assert req["project_id"] == "1; touch /tmp/pwned $(id) `id`"
    assert cfg.mlflow.experiment == "project_1; touch /tmp/pwned $(id) `id`"


@pytest.mark.parametrize("field,value,needle", [
    ("dataset_path", "/etc", "dataset_path '/etc' is not under an allowed prefix"),
    ("dataset_path", "data/demo", "dataset_path 'data/demo': local paths must be absolute"),
    ("dataset_path", "{allowed}/../../etc", "'..' is not allowed"),
    ("dataset_path", "file:///etc", "scheme 'file:' is not allowed"),
    ("dataset_path", "s3://other-bucket/ds", "is not under an allowed prefix"),
    ("checkpoint_path", "/root/best.pt", "checkpoint_path '/root/best.pt' is not under an allowed prefix"),
])
def test_data_paths_outside_the_allowlist_are_403(data, field, value, needle):
    value = value.format(allowed=data)
    status, detail = _status(jobs.prepare, request(data, **{field: value}), allow_data=[str(data)],
                             runs_storage="/runs")
    assert status == 403 and needle in detail, detail


def test_a_symlink_out_of_the_allowlist_is_403(data, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (data / "link").symlink_to(outside)
    status, detail = _status(jobs.check_data_paths, {"dataset_path": str(data / "link")}, [str(data)])
    assert status == 403 and "dataset_path" in detail and "(resolved)" in detail


def test_checkpoint_path_under_the_allowlist_becomes_init_checkpoint(data):
    ckpt = str(data / "jobs" / "9" / "best.pt")
    _, cfg = jobs.prepare(request(data, checkpoint_path=ckpt), allow_data=[str(data)], runs_storage="/runs")
    assert cfg.model.init_checkpoint == ckpt


def test_entrypoint_is_built_from_server_values_only():
    cmd = jobs.entrypoint("/opt/py thon/bin/python", "/runs dir/.training-api/configs/ab12.yaml")
    assert shlex.split(cmd) == ["/opt/py thon/bin/python", "-m", "raytimm.cli", "train", "--config",
                                "/runs dir/.training-api/configs/ab12.yaml"]
    assert jobs.submission_id(42, 3) == "raytimm-job_42-3" == jobs.submission_id("42", 3)


def test_config_file_round_trips_through_train_config(data, tmp_path):
    _, cfg = jobs.prepare(request(data), allow_data=[str(data)], runs_storage=str(tmp_path / "runs"))
    path = tmp_path / "job.yaml"
    path.write_text(jobs.config_yaml(cfg))
    again = load_config(str(path))
    assert (again.run.name, again.storage.path, again.data.path, again.train.epochs) == \
        ("job_42", str(tmp_path / "runs"), str(data), 3)


@pytest.mark.s3
def test_train_config_and_request_read_from_a_bucket(s3_env, data, tmp_path):
    """`raytimm train --config s3://...` (how the API's jobs read theirs when runs live in a bucket)."""
    from raytimm import storage

    _, cfg = jobs.prepare(request(data), allow_data=[str(data)], runs_storage=s3_env.uri("runs"))
    uri = storage.write_text(s3_env.uri("runs/.training-api/configs/x.yaml"), jobs.config_yaml(cfg))
    assert load_config(uri).storage.path == s3_env.uri("runs")
    req_uri = storage.write_text(s3_env.uri("req.json"), json.dumps(request(data)))
    assert load_training_request(req_uri).run.name == "job_42"
    with pytest.raises(ConfigError, match="config file 's3://.*/missing.yaml' does not exist"):
        load_config(s3_env.uri("missing.yaml"))


@pytest.fixture(params=["local", pytest.param("bucket", marks=pytest.mark.s3)])
def runs_storage(request, tmp_path):
    """The API's runs storage: a local folder, or a prefix on the S3-compatible test server."""
    if request.param == "local":
        return str(tmp_path / "runs")
    return request.getfixturevalue("s3_env").uri(f"runs-{tmp_path.name}")


def test_registry_persists_records_and_lists_newest_first(runs_storage):
    from raytimm import storage

    reg = jobs.JobRegistry(runs_storage)
    assert reg.list() == [] and reg.read(1) is None
    first = reg.new_record({"training_job_id": 1, "project_id": 1})
    first["created_at"] = "2026-01-01T00:00:00+00:00"
    reg.write(jobs.add_attempt(first, ray_job_id="raytimm-job_1-1", config_uri="c1", epochs=2))
    second = jobs.add_attempt(reg.new_record({"training_job_id": "b-2", "project_id": 1}),
                              ray_job_id="raytimm-job_b-2-1", config_uri=None, epochs=3)
    reg.write(second)
    jobs.add_attempt(second, ray_job_id="raytimm-job_b-2-1", config_uri=None, epochs=3)  # the same attempt again
    assert len(second["attempts"]) == 1
    # A new registry over the same storage (a restarted server, another replica) knows both.
    again = jobs.JobRegistry(runs_storage)
    assert [r["training_job_id"] for r in again.list()] == ["b-2", 1]
    assert again.read("1")["run_dir"] == storage.join(runs_storage, "job_1")
    assert again.read(1)["attempts"][0]["ray_job_id"] == "raytimm-job_1-1"
    assert jobs.start_answer(again.read(1)) == {"status": "success", "training_job_id": 1,
                                                "ray_job_id": "raytimm-job_1-1", "run_name": "job_1"}
    assert reg.new_config_uri() != reg.new_config_uri()
    assert reg.new_config_uri().startswith(storage.join(runs_storage, ".training-api", "configs") + "/")


def _record(tmp_path):
    reg = jobs.JobRegistry(str(tmp_path))
    rec = reg.new_record({"training_job_id": 5, "project_id": 1})
    return jobs.add_attempt(rec, ray_job_id="raytimm-job_5-1", config_uri=None, epochs=4)


def test_job_view_takes_the_state_from_ray_and_the_rest_from_progress(tmp_path):
    rec = _record(tmp_path)
    folder = runs.RunFolder(rec["run_dir"], run_name="job_5", metric="val/top1", mode="max", epochs=4)
    folder.start()
    progress = runs.read_progress(rec["run_dir"])
    pending = jobs.job_view(rec, {"status": "PENDING", "message": None, "end_time": None}, None)
    assert (pending["state"], pending["epoch"], pending["epochs"], pending["progress"]) == ("PENDING", 0, 4, 0.0)
    assert pending["started_at"] == rec["created_at"] and pending["finished_at"] is None
    running = jobs.job_view(rec, {"status": "RUNNING", "message": None, "end_time": None}, {
        **progress, "epoch": 1, "progress": 0.25, "metrics": {"epoch": 1, "val/top1": 50.0},
        "history": [{"epoch": 1, "val/top1": 50.0}]})
    assert (running["state"], running["epoch"], running["progress"]) == ("RUNNING", 1, 0.25)
    assert running["history"] == [{"epoch": 1, "val/top1": 50.0}] and running["message"] is None
    assert "history" not in jobs.job_view(rec, {"status": "RUNNING"}, progress, history=False)
    stopped = jobs.job_view(rec, {"status": "STOPPED", "message": "Job was intentionally stopped.",
                                  "end_time": 1767225600000}, progress)
    assert stopped["state"] == "STOPPED" and stopped["finished_at"] == "2026-01-01T00:00:00+00:00"


def test_job_view_message_of_a_failed_job(tmp_path):
    rec = _record(tmp_path)
    failed = {"status": "FAILED", "message": "Job entrypoint command failed with exit code 2", "end_time": None}
    from_progress = jobs.job_view(rec, failed, {"status": "failed", "message": "data.path '/x' does not exist"},
                                  log_line="error: data.path '/x' does not exist")
    assert from_progress["message"] == "data.path '/x' does not exist"
    logs = "starting\nerror: config file '/c.yaml' does not exist\n\n"
    from_logs = jobs.job_view(rec, failed, None, log_line=jobs.last_log_line(logs))
    assert from_logs["message"] == "error: config file '/c.yaml' does not exist"
    assert jobs.job_view(rec, failed, None)["message"] == failed["message"]


def test_job_view_when_ray_forgot_the_job(tmp_path):
    rec = _record(tmp_path)
    assert jobs.job_view(rec, None, {"status": "finished", "progress": 1.0})["state"] == "SUCCEEDED"
    lost = jobs.job_view(rec, None, {"status": "running", "progress": 0.5})
    assert lost["state"] == "FAILED" and "raytimm-job_5-1" in lost["message"] and "again" in lost["message"]


@pytest.mark.parametrize("text", ["42", "job-a_1"])
def test_path_ids_that_could_name_a_job(text):
    assert jobs.check_job_id(text) == text


@pytest.mark.parametrize("text", ["..", "a/b", "", "x" * 65, "-a", "%2e%2e"])
def test_path_ids_that_cannot_name_a_job_are_404(text):
    assert _status(jobs.check_job_id, text)[0] == 404


# ----------------------------------------------------------------------------- settings and safety

def test_training_settings_are_flags_and_config_keys(tmp_path):
    s = settings_from_cli(None, {"training_api": True, "runs_storage": "s3://b/runs", "allow_data": ["/d", "s3://b/ds"],
                                 "ray_dashboard_url": "http://127.0.0.1:8265"})
    assert (s.training_api, s.runs_storage, s.allow_data) == (True, "s3://b/runs", ["/d", "s3://b/ds"])
    assert ServeArgs(checkpoint="x", allow_data="/a,/b").allow_data == ["/a", "/b"]
    assert ServeSettings().training_api is False and ServeSettings().runs_storage == "./runs"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("serve:\n  training_api: true\n  allow_data: [/data]\n")
    assert load_config(str(cfg)).serve.allow_data == ["/data"]
    out = subprocess.run([sys.executable, "-m", "raytimm.cli", "serve", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120).stdout
    for flag in ("--training-api", "--runs-storage", "--allow-data", "--training-config", "--ray-dashboard-url"):
        assert flag in out


@pytest.mark.parametrize("host,loop", [("127.0.0.1", True), ("127.3.0.1", True), ("::1", True), ("localhost", True),
                                       ("0.0.0.0", False), ("192.0.2.1", False), ("::", False), (None, False)])
def test_loopback_hosts(host, loop):
    assert is_loopback(host) is loop


def test_the_training_api_refuses_an_exposed_server_without_a_token(monkeypatch):
    monkeypatch.delenv("RAYTIMM_API_TOKEN", raising=False)
    args = ServeArgs(checkpoint="x", training_api=True, allow_data=["/data"])
    check_training_api(args, host="127.0.0.1")
    with pytest.raises(ConfigError, match=r"set \$RAYTIMM_API_TOKEN, or bind to loopback"):
        check_training_api(args, host="0.0.0.0")
    with pytest.raises(ConfigError, match="may be reachable"):
        check_training_api(args, host=None)
    monkeypatch.setenv("RAYTIMM_API_TOKEN", "t0ken")
    check_training_api(args, host="0.0.0.0")
    with pytest.raises(ConfigError, match="--allow-data"):
        check_training_api(ServeArgs(checkpoint="x", training_api=True), host="127.0.0.1")
    check_training_api(ServeArgs(checkpoint="x"), host="0.0.0.0")  # off: nothing to refuse


def test_raytimm_serve_refuses_before_starting_ray(tmp_path):
    """One line, exit 2, in seconds: the check runs before Ray starts."""
    from tests.test_predict import make_trained_checkpoint

    make_trained_checkpoint(tmp_path / "run", steps=1)
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RAYTIMM_API_TOKEN", "RAY_ADDRESS")}
    r = subprocess.run([sys.executable, "-m", "raytimm.cli", "serve", "--checkpoint", str(tmp_path / "run"),
                        "--training-api", "--allow-data", str(tmp_path), "--host", "0.0.0.0"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines == ["error: the training API starts jobs on the cluster and the server binds to 0.0.0.0: set "
                     "$RAYTIMM_API_TOKEN, or bind to loopback (--host 127.0.0.1)"]


# ----------------------------------------------------------------------------- the page's files

def test_page_fills_in_its_two_facts_and_lists_only_its_files():
    html = page.index_html(auth_required=True, training=False)
    assert 'data-auth="required"' in html and 'data-training="off"' in html and "__" not in html
    assert 'data-auth="none"' in page.index_html(auth_required=False, training=True)
    for name in page.STATIC:
        assert (page.WEB_DIR / name).is_file()
    assert set(p.name for p in page.WEB_DIR.iterdir()) == {"index.html", *page.STATIC}


def test_page_fetches_nothing_from_elsewhere():
    """Only same-origin URLs: no http(s)://, protocol-relative // or remote @import in the page's files."""
    for path in page.WEB_DIR.iterdir():
        text = path.read_text(encoding="utf-8").replace("http://www.w3.org/2000/svg", "")  # an XML namespace
        assert not re.search(r"https?://|[\"'(]//|@import", text), path.name
    assert "connect-src 'self'" in page.HEADERS["Content-Security-Policy"]


def test_page_never_puts_the_token_in_a_url_or_local_storage():
    js = (page.WEB_DIR / "app.js").read_text(encoding="utf-8")
    assert "localStorage" not in js and "sessionStorage" in js
    assert re.search(r"headers\.set\(\"Authorization\", `Bearer \$\{token\}`\)", js)
    assert "innerHTML" not in js  # text from the API goes in with textContent only


def test_page_files_are_package_data():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"raytimm\.serve"\s*=\s*\[\s*"web/\*"\s*\]', text)

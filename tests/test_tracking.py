"""Tests for raytimm.tracking against a real ``mlflow server`` on loopback and the embedded store."""
from __future__ import annotations

import json
import logging
import socket
import threading
import time

import mlflow
import pytest

from raytimm import tracking
from raytimm.tracking import MetricLogger, MlflowLogger, NullLogger, make_logger
from tests.helpers_net import free_port

EXPERIMENT = "raytimm-tests"


@pytest.fixture(autouse=True)
def _isolated_mlflow_env(monkeypatch):
    """Each test starts without MLflow env settings; whatever the code sets is undone after."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                 "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                 "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(name, raising=False)


def tracking_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "raytimm.tracking" and r.levelno == logging.WARNING]


class TcpProxy:
    """Forwards a loopback port to the MLflow server; ``mode`` makes the server go away.

    "forward" passes everything; "cut" drops open connections and closes new ones at once (a
    server that is gone); "blackhole" still delivers requests but drops every answer (a server
    that stored the data while the answer was lost). The port stays the same throughout.
    """

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.sockets: list[socket.socket] = []
        self.closed = False
        self.mode = "forward"
        self.delay_s = 0.0  # added before each request chunk is passed on: a slow server
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.mode == "cut":
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src, dst, answers: bool):
        try:
            while data := src.recv(65536):
                if answers and self.mode == "blackhole":
                    continue
                if not answers and self.delay_s:
                    time.sleep(self.delay_s)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _drop_connections(self):
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self.sockets = []

    def set_mode(self, mode: str):
        self.mode = mode
        if mode == "cut":
            self._drop_connections()

    def close(self):
        self.closed = True
        try:
            # close() alone does not wake a thread blocked in accept(); shutdown() does.
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self._drop_connections()


class HungServer:
    """Accepts TCP connections (counting them) and never answers: a hung tracking server."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.uri = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(conn)

    def close(self):
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        for c in self.connections:
            c.close()


# --------------------------------------------------------------------------- no server needed


def test_flatten_and_scrub_params():
    cfg = {
        "train": {"lr": 0.01, "epochs": 3},
        "data": {"rrc_scale": [0.5, 1.0], "path": "s3://bucket/data"},
        "storage": {"secret_access_key": "s3cr3t", "aws_access_key_id": "AKIAXXXXXXXXXXXXXXXX",
                    "session_token": "tok", "endpoint_url": "https://user:pw@r2.example.com/x"},
        "mlflow": {"password": "pw", "tracking_uri": "http://u:p@mlflow.local:5000"},
        "api_key": "k",
        "empty": {},
    }
    flat = tracking.flatten_params(tracking.scrub_secrets(cfg))
    assert flat == {
        "train.lr": "0.01",
        "train.epochs": "3",
        "data.rrc_scale": "[0.5, 1.0]",
        "data.path": "s3://bucket/data",
        "storage.endpoint_url": "https://***@r2.example.com/x",
        "mlflow.tracking_uri": "http://***@mlflow.local:5000",
        "empty": "{}",
    }


def test_scrub_reaches_into_lists():
    cfg = {"hooks": [{"url": "http://u:p@h.example", "api_token": "T0KEN"}], "Authorization": "Bearer x"}
    flat = tracking.flatten_params(tracking.scrub_secrets(cfg))
    assert flat == {"hooks": '[{"url": "http://***@h.example"}]'}


def test_sanitize_key_keeps_slash_metrics():
    assert tracking.sanitize_key("val/top1") == "val/top1"
    assert tracking.sanitize_key("tune.search_space[lr]") == "tune.search_space_lr_"
    assert tracking.sanitize_key("/a//b/") == "a/b"
    assert len(tracking.sanitize_key("x" * 400)) == tracking.MAX_KEY_LEN


def test_null_logger_conforms_and_does_nothing(tmp_path):
    logger = NullLogger()
    assert isinstance(logger, MetricLogger)
    assert logger.run_id is None
    logger.log_params({"a": 1})
    logger.log_metrics({"val/top1": 1.0}, step=1)
    logger.set_tags({"t": "v"})
    logger.log_artifact(tmp_path / "missing.txt")
    logger.log_text("x", "x.txt")
    logger.finish("FAILED")
    assert isinstance(make_logger(enabled=False, tracking_uri="http://127.0.0.1:1",
                                  experiment=EXPERIMENT, run_name="off"), NullLogger)


def test_ray_job_tags_from_job_submission_env(monkeypatch):
    # What `ray job submit` sets for the entrypoint (ray/dashboard/modules/job/job_supervisor.py).
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_abc123", "job_name": "x"}}))
    assert tracking.ray_job_tags()["ray.job_id"] == "raysubmit_abc123"
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert "ray.job_id" not in tracking.ray_job_tags()


def test_default_tracking_uri(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    uri = tracking.default_tracking_uri(str(runs))
    assert uri == f"sqlite:///{runs}/mlflow.db"
    assert uri.startswith("sqlite:////")  # absolute path: four slashes
    assert tracking.local_artifact_location(uri) == (runs / "mlartifacts").as_uri()
    monkeypatch.chdir(tmp_path)
    # Remote storage: the embedded store stays local, under ./runs.
    assert tracking.default_tracking_uri("r2://bucket/runs") == f"sqlite:///{tmp_path}/runs/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking.default_tracking_uri(str(runs)) == "http://mlflow.example:5000"


def test_embedded_sqlite_store_by_default(tmp_path, caplog):
    runs = tmp_path / "runs"
    logger = make_logger(enabled=True, tracking_uri=None, experiment=EXPERIMENT, run_name="local",
                         storage_path=str(runs))
    assert isinstance(logger, MlflowLogger), tracking_warnings(caplog)
    logger.log_metrics({"val/top1": 50.0}, step=1)
    logger.log_text("hello", "notes/hello.txt")
    logger.finish()
    assert not tracking_warnings(caplog)
    assert (runs / "mlflow.db").is_file()
    assert (runs / "mlartifacts").is_dir()
    assert list((runs / "mlartifacts").rglob("hello.txt"))
    client = mlflow.MlflowClient(f"sqlite:///{runs}/mlflow.db")
    run = client.get_run(logger.run_id)
    assert run.data.metrics == {"val/top1": 50.0}
    assert run.info.status == "FINISHED"


def test_unreachable_server_gives_null_logger_with_warning(caplog):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    logger = make_logger(enabled=True, tracking_uri=uri, experiment=EXPERIMENT, run_name="dead",
                         timeout_s=1)
    assert isinstance(logger, NullLogger)
    (message,) = tracking_warnings(caplog)
    assert uri in message and "continues without MLflow" in message
    assert tracking.find_run(uri, EXPERIMENT, "dead", timeout_s=1) is None


def test_server_that_never_answers_gives_null_logger(caplog):
    # Accepts TCP connections (kernel backlog) but never answers HTTP: a hung server.
    with socket.create_server(("127.0.0.1", 0), backlog=16) as hung:
        uri = f"http://127.0.0.1:{hung.getsockname()[1]}"
        logger = make_logger(enabled=True, tracking_uri=uri, experiment=EXPERIMENT,
                             run_name="hung", timeout_s=1)
    assert isinstance(logger, NullLogger)
    assert len(tracking_warnings(caplog)) == 1


# --------------------------------------------------------------------------- real mlflow server




@pytest.mark.mlflow_server
def test_params_metrics_tags_artifacts(mlflow_server, tmp_path, caplog):
    logger = make_logger(enabled=True, tracking_uri=mlflow_server, experiment=EXPERIMENT,
                         run_name="basic", tags={"raytimm.model": "resnet18"})
    assert isinstance(logger, MlflowLogger), tracking_warnings(caplog)
    assert isinstance(logger, MetricLogger)
    logger.log_params({
        "model": {"name": "resnet18", "img_size": 64},
        "storage": {"path": "r2://bucket/runs", "secret_access_key": "s3cr3t"},
        "long": "x" * 10_000,
    })
    for epoch in (1, 2):
        logger.log_metrics({"train/loss": 1.0 / epoch, "val/top1": 40.0 + epoch, "epoch": epoch,
                            "note": "not a number"}, step=epoch)
    logger.set_tags({"checkpoint.best": "r2://bucket/runs/basic/checkpoint_000001"})
    (tmp_path / "cm.png").write_bytes(b"\x89PNG fake")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "per_class.csv").write_text("class,support\n")
    logger.log_artifact(tmp_path / "cm.png", "plots")
    logger.log_artifact(tmp_path / "reports", "reports")  # a folder: its contents
    logger.log_text("data report", "reports/data.txt")
    logger.finish()
    assert not tracking_warnings(caplog)

    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(logger.run_id)
    assert run.info.run_name == "basic"
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.name"] == "resnet18" and params["model.img_size"] == "64"
    assert params["storage.path"] == "r2://bucket/runs"
    assert not any("secret" in k for k in params) and "s3cr3t" not in params.values()
    assert len(params["long"]) == tracking.MAX_PARAM_VALUE_LEN
    history = client.get_metric_history(logger.run_id, "val/top1")
    assert [(m.step, m.value) for m in history] == [(1, 41.0), (2, 42.0)]
    assert "note" not in run.data.metrics
    assert run.data.tags["checkpoint.best"] == "r2://bucket/runs/basic/checkpoint_000001"
    assert run.data.tags["raytimm.model"] == "resnet18"
    assert {f.path for f in client.list_artifacts(logger.run_id, "plots")} == {"plots/cm.png"}
    assert {f.path for f in client.list_artifacts(logger.run_id, "reports")} == {
        "reports/per_class.csv", "reports/data.txt"}


@pytest.mark.mlflow_server
def test_resume_continues_same_run_without_duplicate_epochs(mlflow_server, caplog):
    first = make_logger(enabled=True, tracking_uri=mlflow_server, experiment=EXPERIMENT,
                        run_name="resumable")
    first.log_params({"train": {"lr": 0.1, "epochs": 3}})
    for epoch in (1, 2):
        first.log_metrics({"val/top1": 10.0 * epoch}, step=epoch)
    first.finish("KILLED")  # e.g. the node was preempted

    run_id = tracking.find_run(mlflow_server, EXPERIMENT, "resumable")
    assert run_id == first.run_id
    resumed = make_logger(enabled=True, tracking_uri=mlflow_server, experiment=EXPERIMENT,
                          run_name="resumable", run_id=run_id)
    assert resumed.run_id == first.run_id
    # The same params again are fine; a changed value keeps the original and warns.
    resumed.log_params({"train": {"lr": 0.1, "epochs": 3}})
    assert not tracking_warnings(caplog)
    resumed.log_params({"train": {"lr": 0.5}})
    assert any("train.lr" in m for m in tracking_warnings(caplog))
    # Resuming from the epoch-1 checkpoint replays epoch 2: it must not be logged twice.
    for epoch in (2, 3):
        resumed.log_metrics({"val/top1": 10.0 * epoch + 1}, step=epoch)
    resumed.finish()
    # How `raytimm train` continues a run: found by its name in the same bounded open.
    by_name = make_logger(enabled=True, tracking_uri=mlflow_server, experiment=EXPERIMENT, run_name="resumable",
                          resume_by_name=True)
    assert by_name.run_id == first.run_id
    by_name.finish()

    client = mlflow.MlflowClient(mlflow_server)
    history = client.get_metric_history(run_id, "val/top1")
    assert sorted((m.step, m.value) for m in history) == [(1, 10.0), (2, 20.0), (3, 31.0)]
    run = client.get_run(run_id)
    assert run.data.params["train.lr"] == "0.1"
    assert run.info.status == "FINISHED"
    assert tracking.find_run(mlflow_server, EXPERIMENT, "no-such-run") is None


@pytest.mark.mlflow_server
def test_parent_and_child_runs(mlflow_server):
    parent = make_logger(enabled=True, tracking_uri=mlflow_server, experiment=EXPERIMENT,
                         run_name="sweep")
    child = make_logger(enabled=True, tracking_uri=mlflow_server, experiment=EXPERIMENT,
                        run_name="trial_0", parent_run_id=parent.run_id)
    child.finish()
    parent.finish()
    client = mlflow.MlflowClient(mlflow_server)
    assert client.get_run(child.run_id).data.tags[tracking.PARENT_RUN_TAG] == parent.run_id
    assert tracking.PARENT_RUN_TAG not in client.get_run(parent.run_id).data.tags


def test_hung_server_never_blocks_the_caller_and_is_tried_once_per_cooldown(tmp_path, caplog):
    """Logging calls hand data to the sender thread and return; a hung server costs the sender one
    call timeout per cooldown, and ``finish`` returns within its documented bound."""
    timeout_s = 1.0
    hung = HungServer()
    try:
        logger = tracking.attach_logger(hung.uri, "0" * 32, timeout_s=timeout_s, cooldown_s=600)
        (tmp_path / "f.txt").write_text("x")
        slowest = 0.0
        for epoch in range(1, 201):
            t0 = time.monotonic()
            logger.log_metrics({"val/top1": float(epoch), "train/loss": 1.0 / epoch}, step=epoch)
            logger.log_params({"p": {f"k{epoch}": epoch}})
            logger.set_tags({"t": str(epoch)})
            if epoch % 50 == 0:
                logger.log_artifact(tmp_path / "f.txt")
                logger.log_text("t", "t.txt")
            slowest = max(slowest, time.monotonic() - t0)
        # A correctness bound, not a speed figure: a caller that waited on the server would take
        # at least one HTTP timeout here.
        assert slowest < timeout_s, slowest
        t0 = time.monotonic()
        logger.finish("FINISHED")
        # finish gives up after one failed attempt: about one HTTP timeout (generous margin for a busy box).
        assert time.monotonic() - t0 < tracking._call_timeout(hung.uri, timeout_s) + 5
        # One attempt that hung until the HTTP timeout, then the cooldown; finish made one more.
        assert 1 <= len(hung.connections) <= 2, len(hung.connections)
    finally:
        hung.close()
    warnings = tracking_warnings(caplog)
    assert any("training continues" in w for w in warnings), warnings
    assert any("not recorded" in w and "metric values" in w for w in warnings), warnings


@pytest.mark.mlflow_server
def test_server_going_away_never_raises(mlflow_server, tmp_path, caplog):
    proxy = TcpProxy(int(mlflow_server.rsplit(":", 1)[1]))
    try:
        logger = make_logger(enabled=True, tracking_uri=proxy.uri, experiment=EXPERIMENT,
                             run_name="flaky", timeout_s=2)
        assert isinstance(logger, MlflowLogger)
        logger.log_metrics({"val/top1": 1.0}, step=1)
        assert logger.flush()
        assert not tracking_warnings(caplog)

        proxy.set_mode("cut")  # the tracking server disappears mid-training
        logger.log_metrics({"val/top1": 2.0}, step=2)
        assert not logger.flush()  # one attempt, failed
        (warning,) = tracking_warnings(caplog)
        assert "log_metrics" in warning and "training continues" in warning
        # Further calls wait for the cooldown: no exception, no new warnings.
        (tmp_path / "f.txt").write_text("x")
        logger.log_params({"a": 1})
        logger.set_tags({"b": "c"})
        logger.log_artifact(tmp_path / "f.txt")
        logger.log_text("t", "t.txt")
        assert len(tracking_warnings(caplog)) == 1
        logger.finish("FAILED")  # tries once more (bounded), warns what was lost, does not raise
        assert len(tracking_warnings(caplog)) == 2
        assert "not recorded" in tracking_warnings(caplog)[1]
    finally:
        proxy.close()

    client = mlflow.MlflowClient(mlflow_server)
    assert [m.step for m in client.get_metric_history(logger.run_id, "val/top1")] == [1]


@pytest.mark.mlflow_server
def test_outage_backfill_logs_each_step_exactly_once(mlflow_server, caplog):
    """Answers lost after the server stored the data, then a dead server, then recovery: what was
    missed is sent when the server answers again, and every (metric, step) is stored once."""
    proxy = TcpProxy(int(mlflow_server.rsplit(":", 1)[1]))
    client = mlflow.MlflowClient(mlflow_server)
    keys = ("val/top1", "train/loss")

    def log(logger, epoch):
        logger.log_metrics({"val/top1": 10.0 * epoch, "train/loss": 1.0 / epoch}, step=epoch)

    def steps(run_id, key):
        return sorted(m.step for m in client.get_metric_history(run_id, key))

    try:
        logger = make_logger(enabled=True, tracking_uri=proxy.uri, experiment=EXPERIMENT, run_name="outage",
                             timeout_s=5, cooldown_s=0.2)
        assert isinstance(logger, MlflowLogger)
        log(logger, 1)
        assert logger.flush()

        proxy.set_mode("blackhole")  # epoch 2 reaches the server, its answer never comes back
        log(logger, 2)
        deadline = time.monotonic() + 60
        while steps(logger.run_id, "val/top1") != [1, 2]:
            assert time.monotonic() < deadline, "epoch 2 never reached the server"
            time.sleep(0.1)
        assert not logger.flush(timeout_s=30)  # its answer was lost: the sender counts it as failed

        proxy.set_mode("cut")  # then the server is gone
        log(logger, 3)
        log(logger, 4)
        assert not logger.flush(timeout_s=30)

        proxy.set_mode("forward")  # and back
        log(logger, 5)
        assert logger.flush(timeout_s=60)
        logger.finish()
    finally:
        proxy.close()

    for key in keys:
        assert steps(logger.run_id, key) == [1, 2, 3, 4, 5], key
    history = {m.step: m.value for m in client.get_metric_history(logger.run_id, "val/top1")}
    assert history == {e: 10.0 * e for e in range(1, 6)}
    assert client.get_run(logger.run_id).info.status == "FINISHED"
    warnings = tracking_warnings(caplog)
    assert any("training continues" in w for w in warnings) and any("answers again" in w for w in warnings)


@pytest.mark.mlflow_server
def test_backfill_rereads_the_server_and_adds_only_missing_epochs(mlflow_server):
    """What the end of `raytimm train` does: another process logged some epochs; the backfill from
    the checkpoint history adds the others, each once, also when it is asked for while the
    sender is in the middle of sending something else."""
    proxy = TcpProxy(int(mlflow_server.rsplit(":", 1)[1]))
    try:
        driver = make_logger(enabled=True, tracking_uri=proxy.uri, experiment=EXPERIMENT, run_name="backfill")
        assert isinstance(driver, MlflowLogger)
        # The controller's logger sends epochs 1 and 3 after the driver's logger opened the run.
        controller = tracking.attach_logger(mlflow_server, driver.run_id)
        for epoch in (1, 3):
            controller.log_metrics({"val/top1": float(epoch)}, step=epoch)
        controller.close()
        # The controller's epochs are on the server: what the backfill must not send again.
        held = mlflow.MlflowClient(mlflow_server).get_metric_history(driver.run_id, "val/top1")
        assert sorted(m.step for m in held) == [1, 3]
        proxy.delay_s = 1.0
        driver.set_tags({"raytimm.best_checkpoint": "x"})  # the sender is busy with this (slow) call...
        time.sleep(0.3)
        driver.backfill([{"epoch": e, "val/top1": float(e), "note": "x"} for e in (1, 2, 3, 4)])  # ...meanwhile
        driver.finish()
    finally:
        proxy.close()
    client = mlflow.MlflowClient(mlflow_server)
    assert sorted(m.step for m in client.get_metric_history(driver.run_id, "val/top1")) == [1, 2, 3, 4]
    assert client.get_run(driver.run_id).data.tags["raytimm.best_checkpoint"] == "x"

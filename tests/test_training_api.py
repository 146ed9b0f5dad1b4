"""The training API and the page end to end: a real `ray start --head` on loopback with its token, `raytimm serve
--training-api` joined to it (RAY_ADDRESS), real HTTP, Ray jobs that really train, and Debian's chromium.

One head and one Serve app for the module. Two runs start at once: `job_101` (2 epochs, to success) and
`job_stop-me` (many epochs, stopped after its first checkpoint and resumed). The browser watches the first
reach 100 % and stops the second with the page's button.
"""
import concurrent.futures as cf
import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.fixtures.browser import enter_token, launch_chromium, watch_errors
from tests.helpers_net import free_port
from tests.helpers_ray import ray_head_process
from tests.helpers_serve import raytimm_serve
from tests.test_readme_curl import readme_curl_commands

pytestmark = [pytest.mark.ray, pytest.mark.serve, pytest.mark.e2e, pytest.mark.slow]

TOKEN = "training-api-test-token-0123"
CLASSES = ["circle_red", "square_blue", "triangle_green"]
LONG = 200  # epochs of the run that is stopped: it must still be running when the stop arrives


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The server's folder: data/demo (3 classes, 32 px), the served run, the base config of API runs."""
    from raytimm.data.demo import make_demo_dataset
    from tests.test_predict import make_trained_checkpoint

    work = tmp_path_factory.mktemp("training-api")
    make_demo_dataset(str(work / "data" / "demo"), classes=3, per_class=12, size=32, seed=0)
    make_trained_checkpoint(work / "served")
    (work / "train.yaml").write_text(
        "data: {num_workers: 0, rrc: false}\nscaling: {num_workers: 1, use_gpu: false}\nmlflow: {enabled: false}\n"
        "train: {threads: 1}\n")
    return work


@pytest.fixture(scope="module")
def server(work, tmp_path_factory):
    """`raytimm serve --training-api` on a loopback head; yields (url, session with the token)."""
    port = free_port()
    with ray_head_process(4, tmp_path_factory.mktemp("head")) as (address, _dashboard, head_env):
        env = {**head_env, "RAY_ADDRESS": address, "RAYTIMM_API_TOKEN": TOKEN}
        # Relative --runs-storage: made absolute where the server starts (its cwd).
        args = ["--checkpoint", str(work / "served"), "--num-cpus", "0.5", "--ingress-num-cpus", "0.1", "--ingress-replicas", "2",
                "--training-api", "--runs-storage", "runs", "--allow-data", str(work / "data"),
                "--training-config", "train.yaml"]
        with raytimm_serve(args, port=port, cwd=work, env=env, ready_timeout_s=420):
            session = requests.Session()
            session.headers["Authorization"] = f"Bearer {TOKEN}"
            yield f"http://127.0.0.1:{port}", session


def request(work, job_id, **change):
    req = {"training_job_id": job_id, "project_id": 3, "framework": "timm", "model_name": "test_resnet",
           "dataset_path": str(work / "data" / "demo"), "epochs": 2, "batch_size": 8, "learning_rate": 0.01,
           "img_size": 32}
    return {**req, **change}


def status(server, job_id):
    url, s = server
    r = s.get(f"{url}/training/{job_id}", timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(server, job_id, done, timeout_s=600, what=""):
    """Poll GET /training/{id} until done(status) holds; the last status in the failure message."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        last = status(server, job_id)
        if done(last):
            return last
        assert last["state"] != "FAILED", last
        time.sleep(2)
    raise AssertionError(f"job {job_id} {what}: not reached in {timeout_s}s; last: {json.dumps(last)[:2000]}")


@pytest.fixture(scope="module")
def marker(tmp_path_factory):
    return tmp_path_factory.mktemp("pwned") / f"pwned-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def started(server, work, marker):
    """Both runs, started through HTTP: job 101 by five identical requests at once (two ingress replicas)."""
    url, s = server
    quick = request(work, 101, project_id=f"1; touch {marker}")
    with cf.ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda _: s.post(f"{url}/training/start", json=quick, timeout=120), range(5)))
    for r in answers:
        assert r.status_code == 200, r.text
    r = s.post(f"{url}/training/start", json=request(work, "stop-me", epochs=LONG), timeout=120)
    assert r.status_code == 200, r.text
    return {"quick": [a.json() for a in answers], "long": r.json()}


# ----------------------------------------------------------------------------- refused before anything runs

@pytest.mark.parametrize("change,status_code,needle", [
    ({"dataset_path": "/etc"}, 403, "dataset_path '/etc' is not under an allowed prefix"),
    ({"checkpoint_path": "/root/best.pt"}, 403, "checkpoint_path '/root/best.pt' is not under an allowed prefix"),
    ({"learning_rte": 0.1}, 422, "unknown key 'learning_rte'"),
    ({"epochs": "2"}, 422, "epochs='2' has the wrong type"),
    ({"framework": "yolo"}, 422, "framework='yolo'"),
    ({"training_job_id": "7; touch /tmp/x"}, 422, "training_job_id='7; touch /tmp/x' is invalid"),
])
def test_bad_requests_are_refused_and_start_nothing(server, work, change, status_code, needle):
    url, s = server
    r = s.post(f"{url}/training/start", json=request(work, 900, **change), timeout=60)
    assert r.status_code == status_code, r.text
    assert needle in r.json()["detail"]
    assert s.get(f"{url}/training/900", timeout=60).status_code == 404


def test_the_training_api_needs_the_token_and_the_page_is_public(server, work):
    url, _ = server
    home = requests.get(f"{url}/", timeout=60)
    assert home.status_code == 200 and 'data-auth="required" data-training="on"' in home.text
    assert "connect-src 'self'" in home.headers["content-security-policy"]
    assert requests.get(f"{url}/web/app.js", timeout=60).headers["content-type"].startswith("text/javascript")
    assert requests.get(f"{url}/web/page.py", timeout=60).status_code == 404
    assert requests.post(f"{url}/training/start", json=request(work, 901), timeout=60).status_code == 401
    assert requests.get(f"{url}/training", timeout=60).status_code == 401
    r = requests.post(f"{url}/training/start", data=b"{not json", timeout=60,
                      headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["detail"]
    assert requests.get(f"{url}/training/nope", timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}
                        ).status_code == 404


# ----------------------------------------------------------------------------- the page, in a real browser

@pytest.mark.timeout(1500)
def test_page_tries_the_model_and_watches_runs(server, started, work, playwright, tmp_path):
    from playwright.sync_api import expect

    from tests.test_predict import color_image, png_bytes

    url, s = server
    image = tmp_path / "red.png"
    image.write_bytes(png_bytes(color_image("red")))
    api = s.post(f"{url}/predict", files={"file": ("red.png", image.read_bytes(), "image/png")},
                 data={"top_k": "5"}, timeout=60).json()
    browser = launch_chromium(playwright)
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = watch_errors(page)
        page.goto(url + "/")
        enter_token(page, TOKEN)  # the server has a token: the page asks for it before any API call
        expect(page.locator("#model-name")).to_have_text("model: test_resnet")
        expect(page.locator("#class-list li")).to_have_text(["blue", "green", "red"])

        page.set_input_files("#file", str(image))
        expect(page.locator("#bars .bar")).to_have_count(len(api["top_k_predictions"]))
        labels = page.locator("#bars .bar-label").all_inner_texts()
        assert labels == [p["class_name"] for p in api["top_k_predictions"]]
        values = page.locator("#bars .bar-value").all_inner_texts()
        assert values[0] == f"{100 * api['top_k_predictions'][0]['confidence']:.1f} %"
        page.screenshot(path=str(tmp_path / "page-predict.png"), full_page=True)

        # Training: job 101 reaches 100 % on the page; the page's Stop button stops job stop-me.
        quick = page.locator('#jobs tbody tr[data-job="101"]')
        expect(quick.locator(".progress-text")).to_have_text("100 %", timeout=900_000)
        expect(quick.locator(".state")).to_have_text("SUCCEEDED", timeout=300_000)
        long_row = page.locator('#jobs tbody tr[data-job="stop-me"]')
        expect(long_row.locator(".state")).to_have_text("RUNNING", timeout=300_000)
        wait_for(server, "stop-me", lambda st: st["epoch"] >= 1, what="finishing an epoch")
        long_row.locator("button").click()
        expect(long_row.locator(".state")).to_have_text("STOPPED", timeout=120_000)

        quick.click()
        expect(page.locator("#job-title")).to_contain_text("job_101: SUCCEEDED, epoch 2/2 (100 %)")
        expect(page.locator("#chart-acc circle")).to_have_count(4)  # train and val top-1, two epochs each
        expect(page.locator("#chart-loss circle")).to_have_count(4)
        expect(page.locator("#confusion tbody tr")).to_have_count(len(CLASSES))
        expect(page.locator("#confusion thead th")).to_have_text(["true \\ predicted", *CLASSES])
        page.screenshot(path=str(tmp_path / "page-wide.png"), full_page=True)
        if os.environ.get("RAYTIMM_DOCS_SCREENSHOT"):  # how docs/web-page.png is made
            page.screenshot(path=os.environ["RAYTIMM_DOCS_SCREENSHOT"], full_page=True)

        page.set_viewport_size({"width": 390, "height": 844})  # a phone
        expect(quick.locator("td").first).to_be_visible()
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the page is {overflow}px wider than a 390px window"
        page.screenshot(path=str(tmp_path / "page-narrow.png"), full_page=True)
        assert not page.evaluate("location.href").count(TOKEN)
    finally:
        browser.close()
    assert errors == []
    for name in ("page-predict.png", "page-wide.png", "page-narrow.png"):
        assert (tmp_path / name).stat().st_size > 10_000


# ----------------------------------------------------------------------------- the API

@pytest.mark.timeout(1200)
def test_a_run_started_over_http_trains_to_success_and_its_best_checkpoint_serves(server, started, work, marker):
    url, s = server
    ids = {a["ray_job_id"] for a in started["quick"]}
    assert len(ids) == 1, started["quick"]  # five identical starts at once: one Ray job
    answer = started["quick"][0]
    assert answer == {"status": "success", "training_job_id": 101, "ray_job_id": ids.pop(), "run_name": "job_101"}

    done = wait_for(server, 101, lambda st: st["state"] == "SUCCEEDED", what="succeeding")
    assert (done["epoch"], done["epochs"], done["progress"]) == (2, 2, 1.0)
    assert [h["epoch"] for h in done["history"]] == [1, 2]
    assert done["metrics"] == done["history"][-1] and "val/top1" in done["metrics"]
    assert done["message"] is None and done["started_at"] and done["finished_at"]
    runs = work / "runs"
    assert done["run_dir"] == str(runs / "job_101")
    best = done["best_checkpoint"]
    assert best.startswith(str(runs / "job_101") + "/checkpoint_") and (Path(best) / "model.safetensors").is_file()
    assert done["best_metrics"]["val/top1"] == max(h["val/top1"] for h in done["history"])

    # The best checkpoint loads in /inference/quick as status reports it (the runs storage is allowed).
    from tests.test_predict import color_image, png_bytes
    r = s.post(f"{url}/inference/quick", files={"file": ("x.png", png_bytes(color_image("red")), "image/png")},
               data={"training_job_id": "101", "model_name": "test_resnet", "num_classes": "3",
                     "checkpoint_path": best, "top_k": "3"}, timeout=120)
    assert r.status_code == 200, r.text
    assert sorted(p["class_name"] for p in r.json()["top_k_predictions"]) == CLASSES

    # Done: another start answers the same job, submits nothing.
    again = s.post(f"{url}/training/start", json=request(work, 101, project_id=f"1; touch {marker}"), timeout=60)
    assert again.json() == answer

    # The shell metacharacters in project_id were stored as text, never run.
    assert not marker.exists()
    record = json.loads((runs / ".training-api" / "jobs" / "101.json").read_text())
    assert record["request"]["project_id"] == f"1; touch {marker}"
    config = (runs / ".training-api" / "configs").glob("*.yaml")
    assert any(f"project_1; touch {marker}" in p.read_text() for p in config)

    cm = s.get(f"{url}/training/101/confusion", timeout=60).json()
    assert cm["class_names"] == CLASSES and len(cm["confusion_matrix"]) == 3
    assert sum(map(sum, cm["confusion_matrix"])) > 0


@pytest.mark.timeout(1200)
def test_stop_keeps_checkpoints_and_a_new_start_resumes_the_run(server, started, work):
    url, s = server
    first = started["long"]["ray_job_id"]
    st = wait_for(server, "stop-me", lambda st: st["epoch"] >= 1, what="finishing an epoch")
    if st["state"] != "STOPPED":  # the browser test stops it with the page's button; without a browser, here
        r = s.post(f"{url}/training/stop-me/stop", timeout=120)
        assert r.status_code == 200 and r.json()["ray_job_id"] == first, r.text
    stopped = wait_for(server, "stop-me", lambda st: st["state"] == "STOPPED", timeout_s=180, what="stopping")
    assert stopped["epoch"] < LONG and stopped["finished_at"]
    run = work / "runs" / "job_stop-me"
    kept = sorted(p.name for p in run.glob("checkpoint_*") if (p / "model.safetensors").is_file())
    assert kept, "the stopped run's checkpoints were removed"
    assert (run / "latest").is_file()
    # Stopping a stopped job again is fine (backends retry).
    again = s.post(f"{url}/training/stop-me/stop", timeout=60).json()
    assert again == {"status": "success", "training_job_id": "stop-me", "ray_job_id": first, "stopped": False,
                     "state": "STOPPED"}

    # A new start resumes the same run from its latest checkpoint, as a new Ray job.
    r = s.post(f"{url}/training/start", json=request(work, "stop-me", epochs=LONG), timeout=120)
    assert r.status_code == 200, r.text
    second = r.json()["ray_job_id"]
    assert second != first and r.json()["run_name"] == "job_stop-me"
    beyond = stopped["epoch"] + 1
    resumed = wait_for(server, "stop-me", lambda st: st["ray_job_id"] == second and st["epoch"] >= beyond,
                       what=f"resuming to epoch {beyond}")
    # Resumed, not retrained: the epochs before the stop are the very same entries (throughput included).
    assert resumed["history"][:stopped["epoch"]] == stopped["history"]
    assert resumed["attempts"] == 2
    # While it runs: the same request again answers this job; another request for the id is a conflict.
    same = s.post(f"{url}/training/start", json=request(work, "stop-me", epochs=LONG), timeout=120)
    assert same.status_code == 200 and same.json()["ray_job_id"] == second, same.text
    other = s.post(f"{url}/training/start", json=request(work, "stop-me", epochs=LONG + 1), timeout=120)
    assert other.status_code == 409, other.text
    assert "training job 'stop-me' is running with another request; stop it first" in other.json()["detail"]
    r = s.post(f"{url}/training/stop-me/stop", timeout=120)
    assert r.status_code == 200 and r.json()["stopped"] is True, r.text
    wait_for(server, "stop-me", lambda st: st["state"] == "STOPPED", timeout_s=180, what="stopping again")


@pytest.mark.timeout(1200)
def test_a_failed_run_says_why_and_a_new_start_runs_it_again(server, started, work):
    """FAILED with the run's own error line in `message`; after the cause is fixed, the same start succeeds
    as a second attempt of the same run."""
    from raytimm.data.demo import make_demo_dataset

    url, s = server
    data = work / "data" / "later"  # under --allow-data, so the request passes; not there yet, so the run fails
    req = request(work, "fails-first", dataset_path=str(data))
    r = s.post(f"{url}/training/start", json=req, timeout=120)
    assert r.status_code == 200, r.text
    first = r.json()["ray_job_id"]
    failed = wait_for(server, "fails-first", lambda st: st["state"] == "FAILED", what="failing")
    assert "does not exist" in failed["message"] and str(data) in failed["message"], failed["message"]
    assert "\n" not in failed["message"] and failed["finished_at"] and failed["progress"] < 1.0

    make_demo_dataset(str(data), classes=3, per_class=12, size=32, seed=1)
    r = s.post(f"{url}/training/start", json=req, timeout=120)
    assert r.status_code == 200, r.text
    second = r.json()["ray_job_id"]
    assert second != first and r.json()["run_name"] == "job_fails-first"
    done = wait_for(server, "fails-first", lambda st: st["ray_job_id"] == second and st["state"] == "SUCCEEDED",
                    what="succeeding on the second attempt")
    assert done["attempts"] == 2 and done["message"] is None
    assert [h["epoch"] for h in done["history"]] == [1, 2] and done["progress"] == 1.0


def test_jobs_are_listed_newest_first_from_the_registry(server, started):
    url, s = server
    listed = s.get(f"{url}/training", timeout=60).json()["jobs"]
    ids = [j["training_job_id"] for j in listed]
    assert ids.index("stop-me") < ids.index(101)
    for job in listed:
        assert "history" not in job and job["state"] in ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED")


# ----------------------------------------------------------------------------- the README's lines, verbatim

@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_training_curl_lines_work(server, work):
    url, _ = server
    port = url.rsplit(":", 1)[1]
    env = {**os.environ, "RAYTIMM_API_TOKEN": TOKEN}
    outputs = []
    for cmd in readme_curl_commands("training-examples"):
        cmd = cmd.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        r = subprocess.run(["bash", "-c", cmd + " -w '\\n%{http_code}'"], cwd=work, env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, (cmd, r.stderr)
        body, _, code = r.stdout.rpartition("\n")
        assert code == "200", (cmd, code, body)
        outputs.append(json.loads(body))
    start, state, stop = outputs
    assert start["status"] == "success" and start["run_name"] == "job_7"
    assert state["training_job_id"] == 7 and state["state"] in ("PENDING", "RUNNING")
    assert stop["status"] == "success" and stop["ray_job_id"] == start["ray_job_id"]
    wait_for(server, 7, lambda st: st["state"] == "STOPPED", timeout_s=180, what="stopping")

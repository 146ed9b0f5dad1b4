"""Search-space parsing, trial configs, sweep naming and result tables: no Ray cluster (a few tests import Ray)."""
from __future__ import annotations

import csv
import glob
import io
import sys

import pytest
import yaml

from raytimm.config import Config, load_config
from raytimm.errors import ConfigError, RaytimmError
from raytimm.tune_results import TrialSummary, TuneResult, format_table, pick_best, table_csv, trials_table
from raytimm.tune_space import (
    Dimension,
    apply_trial_config,
    check_searcher,
    default_tune_name,
    derive_max_concurrent,
    grid_size,
    parse_search_space,
    trial_resources,
)

ISSUE_SPACE = yaml.safe_load("""
train.lr: {loguniform: [1.0e-4, 1.0e-2]}
train.weight_decay: {choice: [0.0, 0.05]}
model.name: {grid: [resnet18, efficientnet_b0]}
""")


def test_parsing_the_search_space_keeps_ray_and_torch_unimported():
    # The CLI checks a sweep's config before paying for Ray's import.
    import subprocess

    code = ("import sys, raytimm.tune_space as t, raytimm.ray_tune, raytimm.tune_results; "
            "from raytimm.config import Config; "
            "t.parse_search_space({'train.lr': {'uniform': [0.1, 0.2]}}, Config()); "
            "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_issue_example_parses_into_one_dimension_per_key():
    dims = parse_search_space(ISSUE_SPACE, Config())
    assert [(d.key, d.kind) for d in dims] == [
        ("train.lr", "loguniform"), ("train.weight_decay", "choice"), ("model.name", "grid")]
    assert dims[0].args == (1e-4, 1e-2)
    assert grid_size(dims) == 2


@pytest.mark.parametrize("key, spec", [
    ("train.lr", {"uniform": [0.001, 0.01]}),
    ("train.batch_size", {"randint": [8, 65]}),
    ("train.batch_size", {"quniform": [16, 128, 16]}),
    ("train.batch_size", {"choice": [16, 32]}),
    ("model.name", {"choice": ["resnet18", "test_vit"]}),
    ("data.rrc", {"grid": [True, False]}),
    ("train.label_smoothing", {"quniform": [0.0, 0.2, 0.05]}),
])
def test_every_distribution_kind_is_accepted(key, spec):
    (dim,) = parse_search_space({key: spec}, Config())
    assert dim.key == key and dim.kind == next(iter(spec))


@pytest.mark.parametrize("space, names", [
    ({"train.lrr": {"choice": [0.1]}}, ["train.lrr", "did you mean 'train.lr'"]),
    ({"trian.lr": {"choice": [0.1]}}, ["trian.lr", "train.lr"]),
    ({"lr": {"choice": [0.1]}}, ["tune.search_space.lr"]),
])
def test_unknown_key_is_named_with_the_closest_valid_one(space, names):
    with pytest.raises(ConfigError) as e:
        parse_search_space(space, Config())
    for name in names:
        assert name in str(e.value)


@pytest.mark.parametrize("spec, words", [
    ({"normal": [0, 1]}, ["normal", "choice", "loguniform"]),
    ({"logunifrom": [1e-4, 1e-2]}, ["logunifrom", "did you mean 'loguniform'"]),
    ([1e-3, 1e-2], ["expected one distribution"]),
    (0.01, ["expected one distribution"]),
    ({"choice": [0.1], "grid": [0.2]}, ["expected one distribution"]),
    ({"choice": []}, ["choice needs a non-empty list"]),
    ({"uniform": [0.1]}, ["uniform needs [low, high]"]),
    ({"uniform": [0.2, 0.1]}, ["low < high"]),
    ({"loguniform": [0.0, 0.1]}, ["0 < low < high"]),
    ({"loguniform": "1e-4..1e-2"}, ["loguniform needs"]),
    ({"quniform": [0.001, 0.01]}, ["[low, high, q]"]),
    ({"quniform": [0.001, 0.01, 0]}, ["q > 0"]),
    ({"randint": [0.5, 3]}, ["randint needs [low, high] integers"]),
    ({"uniform": [-1.0, 0.1]}, ["low end", "train.lr", "> 0"]),
    ({"choice": [0.001, "fast"]}, ["choice value 'fast'", "train.lr"]),
])
def test_bad_distribution_spec_is_named(spec, words):
    with pytest.raises(ConfigError) as e:
        parse_search_space({"train.lr": spec}, Config())
    msg = str(e.value)
    assert "tune.search_space.train.lr" in msg
    for w in words:
        assert w in msg, msg


def test_fractional_draws_for_an_integer_key_are_refused_up_front():
    with pytest.raises(ConfigError, match=r"train\.batch_size: uniform draws fractional values.*randint"):
        parse_search_space({"train.batch_size": {"uniform": [16, 64]}}, Config())
    with pytest.raises(ConfigError, match=r"train\.epochs: quniform with q=0.5"):
        parse_search_space({"train.epochs": {"quniform": [1, 4, 0.5]}}, Config())


def test_choice_values_are_type_checked_against_the_key():
    with pytest.raises(ConfigError, match=r"tune\.search_space\.model\.img_size: choice value 'big'"):
        parse_search_space({"model.img_size": {"choice": [32, "big"]}}, Config())
    with pytest.raises(ConfigError, match=r"tune\.search_space\.train\.amp: grid value 'fp8'"):
        parse_search_space({"train.amp": {"grid": ["bf16", "fp8"]}}, Config())


@pytest.mark.parametrize("key", ["tune.num_samples", "storage.path", "run.name", "mlflow.experiment"])
def test_keys_that_place_the_sweep_cannot_be_swept(key):
    with pytest.raises(ConfigError, match=rf"{key.replace('.', r'[.]')} cannot be swept"):
        parse_search_space({key: {"choice": [1, 2]}}, Config())


def test_grid_with_optuna_is_refused_naming_the_key():
    dims = parse_search_space(ISSUE_SPACE, Config())
    check_searcher(dims, "random")
    with pytest.raises(ConfigError, match=r"tune\.search_space\.model\.name: grid is not supported with "
                                          r"tune\.searcher=optuna"):
        check_searcher(dims, "optuna")
    check_searcher([d for d in dims if d.kind != "grid"], "optuna")


def test_trial_values_land_on_the_config_typed():
    cfg = apply_trial_config(Config(), {"train.lr": 0.005, "train.batch_size": 32.0, "model.name": "test_vit"})
    assert cfg.train.lr == 0.005 and cfg.model.name == "test_vit"
    assert cfg.train.batch_size == 32 and isinstance(cfg.train.batch_size, int)  # quniform gives floats
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        apply_trial_config(Config(), {"train.batch_size": 31.5})


def test_the_same_config_names_the_same_sweep_so_a_rerun_resumes():
    a = load_config("configs/tune/demo_asha.yaml")
    b = load_config("configs/tune/demo_asha.yaml")
    assert default_tune_name(a) == default_tune_name(b)
    assert default_tune_name(a).startswith("tune-test_resnet-")
    c = load_config("configs/tune/demo_asha.yaml", ["train.epochs=4"])
    assert default_tune_name(c) != default_tune_name(a)


def test_concurrency_fits_trials_into_the_cluster():
    cfg = Config()
    cfg.scaling.num_workers = 2
    assert trial_resources(cfg, use_gpu=False) == {"CPU": 2.0}
    assert derive_max_concurrent({"CPU": 2.0}, {"CPU": 8.0}) == 4
    assert derive_max_concurrent({"CPU": 2.0}, {"CPU": 5.0}) == 2
    gpu = trial_resources(cfg, use_gpu=True)
    assert gpu == {"CPU": 2.0, "GPU": 2.0}
    assert derive_max_concurrent(gpu, {"CPU": 64.0, "GPU": 4.0}) == 2
    with pytest.raises(RaytimmError, match=r"one trial needs CPU=2.*cluster has CPU=1.*scaling\.num_workers"):
        derive_max_concurrent({"CPU": 2.0}, {"CPU": 1.0})


def _trial(tid, lr, top1, epochs, status, ckpt="c"):
    return TrialSummary(trial_id=tid, config={"train.lr": lr}, best_metrics={"val/top1": top1, "epoch": 1.0},
                        epochs=epochs, status=status, checkpoint=ckpt)


def test_best_trial_is_picked_by_metric_and_mode_and_needs_a_checkpoint():
    trials = [_trial("a", 0.1, 50.0, 3, "completed"), _trial("b", 0.01, 90.0, 3, "completed"),
              _trial("c", 10.0, 99.0, 1, "stopped", ckpt=None), _trial("d", 1e-7, 25.0, 1, "stopped")]
    assert pick_best(trials, "val/top1", "max").trial_id == "b"
    assert pick_best(trials, "val/top1", "min").trial_id == "d"
    assert pick_best([], "val/top1", "max") is None


def test_results_table_and_csv_hold_swept_values_metric_epochs_status_checkpoint():
    trials = [_trial("a", 0.003, 87.5, 3, "completed", "/runs/t/trial_a/checkpoint_000003"),
              _trial("b", 1e-7, 25.0, 1, "stopped", "/runs/t/trial_b/checkpoint_000001")]
    rows = trials_table(trials, ["train.lr"], "val/top1")
    parsed = list(csv.DictReader(io.StringIO(table_csv(rows))))
    assert parsed[0] == {"trial_id": "a", "train.lr": "0.003", "val/top1": "87.5000", "epochs": "3",
                         "status": "completed", "checkpoint": "/runs/t/trial_a/checkpoint_000003"}
    assert parsed[1]["status"] == "stopped" and parsed[1]["train.lr"] == "1e-07"
    text = format_table(rows)
    assert text.splitlines()[0].split() == ["trial_id", "train.lr", "val/top1", "epochs", "status", "checkpoint"]
    assert "87.5000" in text


def test_result_json_shape():
    t = _trial("a", 0.003, 87.5, 3, "completed")
    r = TuneResult(run_dir="/runs/t", best_checkpoint="c", best_metrics=t.best_metrics, best_config=t.config,
                   best_trial_id="a", latest_checkpoint="c", mlflow_run_id=None, trials=[t])
    d = r.to_dict()
    for key in ("best_checkpoint", "best_metrics", "best_config", "trials", "run_dir", "mlflow_run_id"):
        assert key in d
    assert set(d["trials"][0]) >= {"trial_id", "config", "best_metrics", "epochs", "status", "checkpoint"}


@pytest.mark.parametrize("path", sorted(glob.glob("configs/tune/*.yaml")))
def test_shipped_sweeps_parse(path):
    cfg = load_config(path)
    dims = parse_search_space(cfg.tune.search_space, cfg)
    check_searcher(dims, cfg.tune.searcher)
    assert dims, f"{path} sweeps nothing"


def test_shipped_sweeps_exist():
    names = {p.rsplit("/", 1)[-1] for p in glob.glob("configs/tune/*.yaml")}
    assert {"resnet18_lr_wd.yaml", "model_compare.yaml", "demo_asha.yaml"} <= names


def test_dimension_describes_itself():
    assert Dimension("train.lr", "loguniform", (1e-4, 1e-2)).describe() == "train.lr: loguniform [0.0001, 0.01]"


def test_optuna_searcher_samples_the_parsed_space_with_dotted_keys():
    # Only Tune's search layer: no cluster. Optuna gets the same domains the random searcher does.
    pytest.importorskip("optuna")
    from ray.tune.search.optuna import OptunaSearch

    from raytimm.tune_space import to_param_space

    space = {"train.lr": {"loguniform": [1e-4, 1e-2]}, "train.batch_size": {"quniform": [16, 64, 16]},
             "model.name": {"choice": ["resnet18", "test_vit"]}, "train.epochs": {"randint": [2, 5]}}
    dims = parse_search_space(space, Config())
    check_searcher(dims, "optuna")
    searcher = OptunaSearch(seed=0)
    assert searcher.set_search_properties("val/loss", "min", to_param_space(dims))
    for i in range(3):
        suggested = searcher.suggest(f"t{i}")
        cfg = apply_trial_config(Config(), suggested)  # every suggestion is a valid config
        assert 1e-4 <= cfg.train.lr <= 1e-2 and cfg.train.batch_size in (16, 32, 48, 64)
        assert cfg.model.name in ("resnet18", "test_vit") and 2 <= cfg.train.epochs < 5


def test_cli_reports_a_search_space_error_naming_the_key_before_starting_ray(tmp_path):
    import subprocess
    from pathlib import Path

    raytimm = Path(sys.executable).with_name("raytimm")
    r = subprocess.run([str(raytimm), "tune", "--config", "configs/tune/demo_asha.yaml", f"storage.path={tmp_path}",
                        "tune.search_space={train.lrr: {loguniform: [1.0e-4, 1.0e-2]}}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "tune.search_space.train.lrr" in r.stderr and "did you mean 'train.lr'" in r.stderr
    assert not any(tmp_path.iterdir())  # nothing ran



def test_sweep_paths_are_absolute_for_chdired_trial_drivers_but_the_cache_stays_node_local(tmp_path, monkeypatch):
    # Tune runs each trial's driver inside the trial folder: relative paths must be fixed on the driver.
    from raytimm.ray_tune import _absolutize

    monkeypatch.chdir(tmp_path)
    cfg = _absolutize(load_config(None, ["data.path=data", "storage.path=runs", "mlflow.tracking_uri=sqlite:///ml.db",
                                         "data.cache_dir=$LOCAL_SSD/raytimm"]))
    assert cfg.data.path == str(tmp_path / "data") and cfg.storage.path == str(tmp_path / "runs")
    assert cfg.mlflow.tracking_uri == f"sqlite:///{tmp_path / 'ml.db'}"
    assert cfg.data.cache_dir == "$LOCAL_SSD/raytimm"  # each node expands its own
    remote = _absolutize(load_config(None, ["data.path=s3://b/data", "storage.path=r2://b/runs"]))
    assert (remote.data.path, remote.storage.path) == ("s3://b/data", "r2://b/runs")


def test_a_multi_label_sweep_validates_with_map_as_its_metric():
    cfg = load_config(None, ["data.format=manifest", "data.multi_label=true", "tune.metric=val/mAP",
                             "tune.search_space={train.lr: {loguniform: [0.0001, 0.01]}, "
                             "train.pos_weight: {choice: [none, auto]}}"])
    dims = parse_search_space(cfg.tune.search_space, cfg)
    assert [d.key for d in dims] == ["train.lr", "train.pos_weight"]
    trial = apply_trial_config(cfg, {"train.lr": 0.001, "train.pos_weight": "auto"})
    assert trial.tune.metric == trial.checkpoint.metric == "val/mAP" and trial.train.pos_weight == "auto"
    trials = [TrialSummary(trial_id=t, config={}, best_metrics={"val/mAP": m, "epoch": 1.0}, epochs=1,
                           status="completed", checkpoint="c") for t, m in (("a", 80.0), ("b", 90.0))]
    assert pick_best(trials, "val/mAP", "max").trial_id == "b"
    # A single-label metric is refused for a multi-label sweep, naming the key.
    with pytest.raises(ConfigError, match="tune.metric='val/top5' is a single-label metric"):
        load_config(None, ["data.format=manifest", "data.multi_label=true", "tune.metric=val/top5"])
    # A multi-label-only value in the space is refused up front for a single-label sweep.
    single = load_config(None, ["tune.search_space={train.pos_weight: {choice: [none, auto]}}"])
    with pytest.raises(ConfigError, match="train.pos_weight"):
        parse_search_space(single.tune.search_space, single)

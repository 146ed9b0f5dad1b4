"""Serve settings: one typed source for the config's serve: section, `raytimm serve` flags, build_app's
args and configs/serve.yaml. No Ray is started here."""
import io
import json
import os
import shlex
from pathlib import Path

import pytest
import yaml

from raytimm.cli import build_parser
from raytimm.config import config_to_dict, flatten_config, load_config, valid_keys
from raytimm.envvars import API_TOKEN_ENV
from raytimm.errors import ConfigError
from raytimm.serve.settings import DEFAULTS, ServeArgs, ServeSettings, given_flags, settings_from_cli

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "tok-9f8e7d6c5b4a-do-not-print"


def _cli_settings(*argv):
    a = build_parser().parse_args(["serve", *argv])
    return settings_from_cli(a.config, given_flags(a))


def test_serve_config_section_is_read_and_given_flags_override_it(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 3\nserve:\n  checkpoint: /runs/a\n  port: 9001\n  max_batch_size: 32\n"
                 "  allow: [s3://b/models]\n  autoscaling: {min_replicas: 1, max_replicas: 3}\n")
    s = _cli_settings("--config", str(p))
    assert (s.checkpoint, s.port, s.max_batch_size, s.allow) == ("/runs/a", 9001, 32, ["s3://b/models"])
    assert s.autoscaling == {"min_replicas": 1, "max_replicas": 3}
    assert s.batch_wait_ms == DEFAULTS.batch_wait_ms  # not in the file, not a flag: the default
    s = _cli_settings("--config", str(p), "--port", "9002", "--checkpoint", "/runs/b", "--allow", "/x",
                      "--allow", "/y", "--no-allow-checkpoint-root")
    assert (s.checkpoint, s.port, s.allow, s.allow_checkpoint_root) == ("/runs/b", 9002, ["/x", "/y"], False)
    assert s.max_batch_size == 32  # a flag the user did not give never overrides the file
    # Without --config the flags go over the defaults.
    s = _cli_settings("--checkpoint", "/runs/c", "--num-cpus", "0.5", "--autoscaling", "{max_replicas: 2}")
    assert (s.num_cpus, s.port, s.autoscaling) == (0.5, DEFAULTS.port, {"max_replicas": 2})


def test_serve_without_a_checkpoint_names_both_ways_to_give_one():
    with pytest.raises(ConfigError, match="--checkpoint.*serve.checkpoint"):
        _cli_settings("--port", "9000").app_args()


@pytest.mark.parametrize("override,needle", [
    ("serve.max_batch_size=0", "serve.max_batch_size=0 is out of range: expected >= 1"),
    ("serve.port=70000", "serve.port=70000 is out of range: expected 1..65535"),
    ("serve.max_upload_mb=0", "serve.max_upload_mb=0 is out of range: expected > 0"),
    ("serve.replicas=two", "serve.replicas='two' has the wrong type: expected an integer"),
    ("serve.allow_checkpoint_root=maybe", "serve.allow_checkpoint_root='maybe' has the wrong type: expected a boolean"),
    ("serve.autoscaling=[1]", "serve.autoscaling=[1] has the wrong type: expected a mapping"),
    ("serve.replica=2", "unknown key 'serve.replica' (did you mean 'serve.replicas'?)"),
    ("serve.api_token=x", f"serve.api_token cannot be set in a config"),
])
def test_bad_serve_value_names_the_key(override, needle):
    with pytest.raises(ConfigError) as ei:
        load_config(None, [override])
    assert needle in str(ei.value) and "\n" not in str(ei.value)


def test_bad_serve_value_in_a_file_names_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("serve:\n  max_batch_size: -4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: serve.max_batch_size=-4 is out of range: expected >= 1"):
        load_config(p)
    p.write_text(f"serve:\n  api_token: {TOKEN}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert API_TOKEN_ENV in str(ei.value) and TOKEN not in str(ei.value)


def test_bad_flag_names_the_flag():
    with pytest.raises(ConfigError, match=r"--max-batch-size=0 is out of range: expected >= 1"):
        _cli_settings("--checkpoint", "/x", "--max-batch-size", "0")
    with pytest.raises(SystemExit):  # argparse's own usage error for a non-number
        build_parser().parse_args(["serve", "--port", "eighty"])


def test_backend_flag_offers_the_settings_choices(capsys):
    assert _cli_settings("--checkpoint", "/x", "--backend", "onnx").backend == "onnx"
    assert _cli_settings("--checkpoint", "/x").backend == "torch"
    with pytest.raises(SystemExit):  # argparse refuses what the Literal does not allow, naming the choices
        build_parser().parse_args(["serve", "--backend", "tensorflow"])
    err = capsys.readouterr().err
    assert "--backend: invalid choice: 'tensorflow'" in err and "torch" in err and "onnx" in err


def test_config_keys_cover_every_serve_setting_but_the_token():
    keys = {k.split(".", 1)[1] for k in valid_keys() if k.startswith("serve.")}
    assert keys == set(ServeSettings.model_fields) - {"api_token"}
    flat = flatten_config(load_config(None))
    assert flat["serve.max_batch_size"] == DEFAULTS.max_batch_size and "serve.api_token" not in flat


def test_every_flag_is_a_setting_and_every_setting_a_flag():
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    dests = {a.dest for a in serve._actions} - {"help", "config"}
    assert dests == set(ServeSettings.model_fields) - {"api_token"}


def test_secret_token_never_leaks(monkeypatch):
    args = ServeArgs(checkpoint="/x", api_token=TOKEN)
    settings = ServeSettings(checkpoint="/x", api_token=TOKEN)
    for obj in (args, settings, settings.app_args()):
        texts = [repr(obj), str(obj), json.dumps(obj.model_dump(mode="json")), obj.model_dump_json(),
                 repr(obj.model_dump()), yaml.safe_dump(obj.model_dump(mode="json")), repr(obj.token())]
        for text in texts:
            assert TOKEN not in text
        assert obj.token().get_secret_value() == TOKEN  # still usable by the ingress
    assert settings.app_args().api_token.get_secret_value() == TOKEN
    # From the environment when not given; a config never holds it.
    monkeypatch.setenv(API_TOKEN_ENV, TOKEN)
    assert ServeArgs(checkpoint="/x").token().get_secret_value() == TOKEN
    cfg = load_config(None)
    assert TOKEN not in json.dumps(config_to_dict(cfg)) and TOKEN not in repr(cfg)


def test_serve_args_refuse_unknown_keys():
    # serve.yaml / `serve run` args are checked, not silently ignored.
    with pytest.raises(Exception, match="max_batch"):
        ServeArgs.model_validate({"checkpoint": "/x", "max_batch": 4})


def test_code_version_hashes_every_file_of_the_package():
    from raytimm.serve.app import versioned_sources
    files = {os.path.relpath(p, ROOT) for p in versioned_sources()}
    package = {f"raytimm/serve/{n}" for n in os.listdir(ROOT / "raytimm" / "serve") if n.endswith(".py")}
    assert package <= files and {"raytimm/predict.py", "raytimm/checkpoint.py", "raytimm/model.py"} <= files
    assert all(os.path.isfile(ROOT / f) for f in files)


def test_committed_serve_yaml_is_what_its_documented_command_writes(monkeypatch):
    """configs/serve.yaml comes from the settings' defaults: rerun the command its header names."""
    from raytimm.serve.deploy_config import main

    text = (ROOT / "configs" / "serve.yaml").read_text()
    line = next(ln for ln in text.splitlines() if "Written by `python -m raytimm.serve.deploy_config" in ln)
    command = line.split("`")[1]
    argv = shlex.split(command)[3:]  # after "python -m raytimm.serve.deploy_config"
    monkeypatch.chdir(ROOT)
    out = io.StringIO()
    assert main(argv, out=out) == 0
    assert out.getvalue() == text, ("configs/serve.yaml is stale: run `" + command + " > configs/serve.yaml`")
    # And it says what build_app would do with those settings: the defaults it does not set are ServeArgs'.
    (app,) = yaml.safe_load(text)["applications"]
    args = ServeArgs.model_validate(app["args"])
    assert args.max_batch_size == DEFAULTS.max_batch_size and args.max_models == DEFAULTS.max_models
    model = {d["name"]: d for d in app["deployments"]}["ModelServer"]
    assert model["user_config"]["max_batch_size"] == args.max_batch_size
    assert model["user_config"]["checkpoint"] == args.checkpoint


def test_shipped_serve_sections():
    cfg = load_config(ROOT / "configs" / "serve_cluster.yaml")
    assert cfg.serve.checkpoint.startswith("s3://") and cfg.serve.autoscaling["max_replicas"] >= 1
    # The README's `raytimm serve --config configs/quickstart.yaml` serves the quickstart run.
    s = _cli_settings("--config", str(ROOT / "configs" / "quickstart.yaml"), "--port", "8001")
    assert (s.checkpoint, s.port) == ("runs/quickstart", 8001)


def test_serve_run_import_path_validates_args_with_the_typed_builder(tmp_path):
    """What `serve run raytimm.serve:build_app checkpoint=... replicas=2` does, without starting Ray."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    from tests.test_predict import make_trained_checkpoint

    make_trained_checkpoint(tmp_path / "runs" / "r1", steps=1)
    builder = import_attr("raytimm.serve:build_app")  # the package attribute, loaded lazily
    app = call_user_app_builder_with_args_if_necessary(
        builder, {"checkpoint": str(tmp_path / "runs" / "r1"), "replicas": "2", "allow": "/a,/b"})
    assert isinstance(app, Application)
    with pytest.raises(Exception, match="max_batch"):  # Serve read the annotation: unknown args are refused
        call_user_app_builder_with_args_if_necessary(builder, {"checkpoint": str(tmp_path), "max_batch": 3})

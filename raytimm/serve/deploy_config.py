"""A ``serve deploy`` config (configs/serve.yaml, or a RayService's ``serveConfigV2``) from Serve settings.

    python -m raytimm.serve.deploy_config --config configs/serve_cluster.yaml > configs/serve.yaml

Takes ``raytimm serve``'s flags and ``--config FILE`` (its ``serve:`` section). The deployment options
come from the functions ``build_app`` itself uses, so the file and the builder cannot drift apart;
tests/test_serve_settings.py checks that the committed configs/serve.yaml is what this writes.
"""
import argparse
import re
import shlex
import sys
from typing import Optional, Sequence, TextIO

import yaml

from raytimm.serve.app import ingress_options, model_options
from raytimm.serve.settings import (APP_NAME, QUIET_LOGGING, ServeArgs, ServeSettings, add_arguments, given_flags,
                                    settings_from_cli)

IMPORT_PATH = "raytimm.serve:build_app"

_HEADER = """\
# Ray Serve config for `serve deploy` on a running cluster (a Serve config, not a raytimm train config).
# Written by `{command}` from raytimm's serve
# settings (raytimm/serve/settings.py): change the settings there, or the flags, and run it again.
#
#   ray start --head                       # or a cluster from cluster.yaml / KubeRay
#   serve deploy configs/serve.yaml        # needs the cluster's dashboard (Serve's REST API)
#   serve status
#
# Hot reload: change `deployments[ModelServer].user_config.checkpoint` below and run `serve deploy`
# again. Only user_config changes, so Serve calls reconfigure() on the running replicas: the new
# checkpoint loads beside the old one and is swapped in; a checkpoint that fails to load leaves the
# old model serving and is reported by GET /model (reload_error). Changing `args` instead rebuilds
# the application (a rolling restart).
#
# Secrets: RAYTIMM_API_TOKEN and storage credentials come from the cluster's environment (or the
# provider chain); never put them in this file, it is shown by `serve status` and the dashboard.
"""

_ARGS_NOTE = """\
    # ServeArgs (raytimm/serve/settings.py), validated by Serve before build_app runs; unknown keys are errors.
    # `checkpoint` is the startup model; its storage root (the bucket, or a local run folder's parent) is an
    # allowed prefix for /inference/quick's checkpoint_path unless allow_checkpoint_root is false.
"""

_DEPLOYMENTS_NOTE = """\
    # What build_app makes of the args above, spelled out so an operator can edit it: these override
    # the builder's options, so change both (or write this file again).
"""

_ENV_NOTE = """\
    # runtime_env:                          # non-secret settings replicas need (they do not inherit your shell)
    #   env_vars:
    #     AWS_ENDPOINT_URL: https://s3.example.com   # S3-compatible endpoint; R2 needs R2_ACCOUNT_ID
"""


def deploy_config(settings: ServeSettings) -> dict:
    """The ``serve deploy`` schema (one application) that serves ``settings`` as ``build_app`` would."""
    args: ServeArgs = settings.app_args()
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": settings.host, "port": settings.port},
        "logging_config": dict(QUIET_LOGGING),
        "applications": [{
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": IMPORT_PATH,
            # model_dump leaves the API token out: it never goes into a file.
            "args": args.model_dump(mode="json"),
            "deployments": [{"name": "ModelServer", **model_options(args)},
                            {"name": "Ingress", **ingress_options(args)}],
        }],
    }


class _IndentedLists(yaml.SafeDumper):
    """Indents list items under their key (``applications:\n  - name: ...``), as Serve's own examples do."""

    def increase_indent(self, flow=False, indentless=False):
        return super().increase_indent(flow, False)


def render(settings: ServeSettings, command: str) -> str:
    """``deploy_config(settings)`` as commented YAML: each arg with its one-line doc above it."""
    config = deploy_config(settings)
    body = yaml.dump(config, Dumper=_IndentedLists, sort_keys=False, default_flow_style=False, width=100)
    docs = {name: field.description for name, field in ServeArgs.model_fields.items()}
    out, in_args = [], False
    for line in body.splitlines():
        if out and not line.startswith(" "):
            out.append("")  # a blank line between top-level sections
        if line == "    args:":
            in_args = True
            out.append(_ARGS_NOTE.rstrip("\n"))
        elif line == "    deployments:":
            in_args = False
            out.append(_ENV_NOTE.rstrip("\n"))
            out.append(_DEPLOYMENTS_NOTE.rstrip("\n"))
        match = re.match(r"^      (\w+):", line) if in_args else None
        if match and docs.get(match.group(1)):
            out.append(f"      # {docs[match.group(1)]}")
        out.append(line)
    return _HEADER.format(command=command) + "\n" + "\n".join(out) + "\n"


def main(argv: Optional[Sequence[str]] = None, out: TextIO = sys.stdout) -> int:
    """Print the ``serve deploy`` config for ``raytimm serve``-style flags and ``--config FILE``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m raytimm.serve.deploy_config", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="raytimm config YAML whose serve: section sets the defaults")
    add_arguments(parser)
    namespace = parser.parse_args(argv)
    settings = settings_from_cli(namespace.config, given_flags(namespace))
    out.write(render(settings, command=" ".join(["python -m raytimm.serve.deploy_config", shlex.join(argv)])))
    return 0


if __name__ == "__main__":
    from raytimm.errors import RaytimmError
    try:
        sys.exit(main())
    except RaytimmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

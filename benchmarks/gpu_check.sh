#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): tests marked gpu, resnet50 training (plain loop,
# engine.fit, Ray Train 1 and N workers) and the serve benchmark with both backends; one JSON.
#   benchmarks/gpu_check.sh [--json gpu_check.json] [--dry-run] [--skip tests|train|serve ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout "${GPU_CHECK_TIMEOUT_S:-900}" "$PY" benchmarks/gpu_check.py "$@"

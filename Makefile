# raytimm developer entry points. Each target creates .venv and installs when needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.raytimm-installed
DEMO   ?= demo

.PHONY: install test test-fast demo bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# The whole suite: unit tests, then real Ray / MLflow server / S3 server / Serve / CLI tests.
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

# Unit tests only (no Ray, no servers).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not ray and not serve and not s3 and not mlflow_server and not e2e and not slow"

# Quickstart end to end: demo data -> DICE round trip -> train on 2 CPU workers -> best checkpoint.
demo: $(STAMP)
	$(VENV)/bin/raytimm demo-data --output $(DEMO)/data
	$(VENV)/bin/raytimm demo-data --output $(DEMO)/dice --format dice
	$(VENV)/bin/raytimm convert dice --input $(DEMO)/dice --output $(DEMO)/from-dice
	$(VENV)/bin/raytimm dataset-report --data $(DEMO)/from-dice
	$(VENV)/bin/raytimm train --config configs/quickstart.yaml data.path=$(DEMO)/data storage.path=$(DEMO)/runs \
		run.name=quickstart --result-json $(DEMO)/result.json
	@$(PY) -c "import json; r=json.load(open('$(DEMO)/result.json')); \
		print('val/top1 of the best checkpoint: %.1f' % r['best_metrics']['val/top1'])"
	@echo "serve it:  $(VENV)/bin/raytimm serve --checkpoint $(DEMO)/runs/quickstart"

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/tune_asha.py
	$(PY) benchmarks/serve_load.py
	$(PY) benchmarks/serve_soak.py
	$(PY) benchmarks/serve_replica_loss.py
	$(PY) benchmarks/batch_predict.py
	$(PY) benchmarks/bucket_outage.py

clean:
	rm -rf $(DEMO) runs .pytest_cache

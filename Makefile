# Two commands do all the set-up on a fresh machine:
#   make pipeline   - create the environment (if missing) and run the main job
#   make test       - create the environment (if missing) and run the test suite
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.9
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: env pipeline sweep test bench lock clean

env: $(STAMP)

# torch is pinned in pyproject.toml and installed by pip first: on these CPU machines
# `pip install torch==2.13.0` takes the local CPU wheel, on a GPU node the CUDA build.
# Everything else comes from the lock, resolved by uv (plain pip backtracks on it for minutes).
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0 uv==$(UV_VERSION)
	$(VENV)/bin/uv pip install --quiet --python $(PY) -r requirements.lock
	$(VENV)/bin/uv pip install --quiet --python $(PY) --no-deps -e .
	touch $(STAMP)

pipeline: $(STAMP)
	$(PY) -m flows.pipeline --params params.yaml $(ARGS)

# A budgeted Ray Tune search over params.yaml's sweep.space; the best trial through the gate.
sweep: $(STAMP)
	$(PY) -m flows.sweep --params params.yaml $(ARGS)

# The test files run on pytest-xdist workers, one per CPU as memory allows (tests/conftest.py),
# each file whole on one worker (its module fixtures: one server, one cluster), slowest first.
test: $(STAMP)
	$(PY) -m pytest -q --durations=25 -n auto --dist loadfile --no-loadscope-reorder $(ARGS)

bench: $(STAMP)
	$(PY) bench/bench_train.py $(ARGS)

# Re-resolve the lock after changing dependencies in pyproject.toml.
lock: $(STAMP)
	$(VENV)/bin/uv pip compile requirements.in --python-version 3.11 --find-links /opt/wheels \
	  --no-emit-package torch --no-emit-package ddpm-pipeline --no-header \
	  --annotation-style line -o requirements.lock

clean:
	rm -rf $(VENV) runs .pytest_cache

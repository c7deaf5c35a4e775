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
# Then the environment is compiled to bytecode: uv writes no .pyc files, and where
# PYTHONDONTWRITEBYTECODE is set (containers, CI) Python never caches them either, so every new
# process (each Ray worker, each stage, each test's subprocess) would compile Ray, pandas, MLflow
# and Prefect from source as it imports them: Ray's start-up to the first training step took 48.6 s
# that way and 20.0 s compiled (bench/RESULTS.md). compileall skips what is compiled already; the
# few files of other Python versions inside packages (torch's py312 tests) are left uncompiled.
$(STAMP): requirements.lock pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0 uv==$(UV_VERSION)
	$(VENV)/bin/uv pip install --quiet --python $(PY) -r requirements.lock
	$(VENV)/bin/uv pip install --quiet --python $(PY) --no-deps -e .
	$(PY) -c "import compileall, sysconfig; compileall.compile_dir(sysconfig.get_paths()['purelib'], quiet=2, workers=0)"
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

# tan_keras: `make test` and `make demo` do all the set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# pytest-xdist workers per backend run (CI machines have 2 cores).
JOBS ?= 2

.PHONY: install test pytest-tf pytest-jax bazel-test demo benchmark clean

# Create the venv from the pinned lock and install the package (editable).
$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# Each backend once: pytest on JAX, then `bazel test //...` (one py_test per module) on TensorFlow
# (.bazelrc). `make pytest-tf` runs the TensorFlow suite under pytest too.
test: install pytest-jax bazel-test

pytest-tf: install
	KERAS_BACKEND=tensorflow MPLBACKEND=Agg $(PY) -m pytest -q -n $(JOBS) $(PYTEST_ARGS) tests

pytest-jax: install
	KERAS_BACKEND=jax MPLBACKEND=Agg $(PY) -m pytest -q -n $(JOBS) $(PYTEST_ARGS) tests

# Bazel 4.2.3 from Debian; WORKSPACE stubs keep it offline.
bazel-test: install
	@command -v bazel >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq bazel-bootstrap; }
	bazel test //...

demo: install
	KERAS_BACKEND=$${KERAS_BACKEND:-jax} MPLBACKEND=Agg $(PY) -m experiments.demo

benchmark: install
	KERAS_BACKEND=$${KERAS_BACKEND:-tensorflow} $(PY) -m experiments.benchmark

clean:
	-bazel clean --expunge 2>/dev/null
	rm -rf $(VENV) *.egg-info

# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision are installed first as a known-good pair; pyproject keeps ranges.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
# OpenMP threads sleep instead of spinning while they wait: on a shared or 2-core machine
# spinning threads starve each other (measured: training steps up to 10x slower).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install demo test test-fast test-floor lint docs benchmark gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e ".[test,demo,export,docs]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP)
	$(PY) -m ruff check epsanet tests scripts
	$(VENV)/bin/lint-imports
	$(MAKE) docs
	$(PY) -m pytest -q --timeout=900 --durations=25

# The oldest versions pyproject.toml allows, tested: a venv on the oldest Python (3.10, from pyenv when there)
# with every dependency pinned to its declared floor (.ci/floor_constraints.py turns each `>=X` into `==X`),
# running the tests tests/conftest.py lists in FLOOR_TESTS (pytest -m floor).
FLOOR_VENV ?= .venv-floor
FLOOR_PYTHON ?= $(firstword $(foreach p,$(shell pyenv prefix 3.10 2>/dev/null)/bin/python3 python3.10,\
	$(shell $(p) -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null && echo $(p))) $(PYTHON))
FLOOR_STAMP := $(FLOOR_VENV)/.installed

$(FLOOR_STAMP): pyproject.toml .ci/floor_constraints.py
	rm -rf $(FLOOR_VENV)
	$(FLOOR_PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python .ci/floor_constraints.py export test > $(FLOOR_VENV)/constraints.txt
	$(FLOOR_VENV)/bin/python -m pip install --quiet -c $(FLOOR_VENV)/constraints.txt -e ".[export]" pytest pytest-timeout
	touch $(FLOOR_STAMP)

test-floor: $(FLOOR_STAMP)
	$(FLOOR_VENV)/bin/python -c 'import sys, torch, timm; print("floor venv: Python", sys.version.split()[0], "torch", torch.__version__, "timm", timm.__version__)'
	$(FLOOR_VENV)/bin/python -m pytest -q --timeout=900 -m floor

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check epsanet tests scripts

# the documentation site, into site/ (git-ignored); --strict: a broken link or docstring reference fails
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

benchmark: $(STAMP)
	$(PY) scripts/benchmark.py --optimize --targets scripts/benchmark_targets.json --json benchmark.json --markdown benchmark.md

# on a machine with a CUDA GPU: correctness, AMP, compile, one training epoch and throughput, as a markdown table
gpu-check: $(STAMP)
	$(PY) scripts/gpu_check.py

clean:
	rm -rf $(VENV) $(FLOOR_VENV) build dist site *.egg-info .pytest_cache .ruff_cache

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

.PHONY: install demo test test-fast lint docs benchmark gpu-check clean

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
	$(MAKE) docs
	$(PY) -m pytest -q --timeout=900

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check epsanet tests scripts

# the documentation site, into site/ (git-ignored); --strict: a broken link or docstring reference fails
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

benchmark: $(STAMP)
	$(PY) scripts/benchmark.py --optimize --json benchmark.json --markdown benchmark.md

# on a machine with a CUDA GPU: correctness, AMP, compile, one training epoch and throughput, as a markdown table
gpu-check: $(STAMP)
	$(PY) scripts/gpu_check.py

clean:
	rm -rf $(VENV) build dist site *.egg-info .pytest_cache .ruff_cache

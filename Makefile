# pyro_slots developer commands, in the style of Pyro's Makefile.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
STEPS ?=

.PHONY: venv install demo test test-slow test-gpu lint format bench bench-em clean docs docs-fast

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[test,lint]"
	touch $(STAMP)

venv install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pyro-slots demo $(if $(STEPS),--steps $(STEPS),)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

# The GPU path against the CPU's numbers (needs CUDA; skipped elsewhere, so not part of CI).
test-gpu: $(STAMP)
	@$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'test-gpu: CUDA is not available here (torch.cuda.is_available() is False)')"
	$(PY) -m pytest -q tests/test_cuda.py

lint: $(STAMP)
	$(VENV)/bin/ruff check pyro_slots models tests examples benchmarks docs
	$(VENV)/bin/ruff format --check pyro_slots models tests examples benchmarks docs

format: $(STAMP)
	$(VENV)/bin/ruff check --fix pyro_slots models tests examples benchmarks docs
	$(VENV)/bin/ruff format pyro_slots models tests examples benchmarks docs

DOCS_STAMP := $(VENV)/.docs-installed
SPHINXBUILD := $(VENV)/bin/sphinx-build

$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(PIP) install -q -c constraints.txt -e ".[docs]"
	touch $(DOCS_STAMP)

# The documentation site, every tutorial executed (docs/_build/html/index.html).
docs: $(DOCS_STAMP)
	rm -rf docs/_build docs/auto_tutorials
	$(SPHINXBUILD) -b html -j 1 docs docs/_build/html

# What CI runs: tiny tutorial sizes, every warning an error (a broken docstring fails).
docs-fast: $(DOCS_STAMP)
	rm -rf docs/_build docs/auto_tutorials
	PYRO_SLOTS_DOCS_FAST=1 $(SPHINXBUILD) -b html -W --keep-going -j 1 docs docs/_build/html

bench: $(STAMP)
	$(PIP) install -q -c constraints.txt -e ".[bench]"
	$(PY) -m benchmarks.run

# Batched EM against a scikit-learn loop (issue 22, 3): benchmarks/results/em.md.
bench-em: $(STAMP)
	$(PY) -m benchmarks.bench_em --repeats 9

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache docs/_build docs/auto_tutorials

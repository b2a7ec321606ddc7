# Two commands do all the set-up on a fresh machine (see README.md):
#   make run    create the virtual environment, install, and run the main job
#   make test   create the virtual environment, install, and run the whole test suite
# torch is installed first with its pin (a plain `torch` requirement pulls a multi-GB CUDA build).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup run test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,docs]"
	touch $(STAMP)

run: setup
	$(PY) -m catalog list

lint: setup
	$(VENV)/bin/ruff check catalog implementations kernels tests benchmarks
	$(PY) -m catalog schema --check
	$(PY) -m catalog validate

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build site_build .pytest_cache .ruff_cache .hypothesis

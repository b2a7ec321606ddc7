# Two commands do all the set-up on a fresh machine (see README.md):
#   make run    create the virtual environment, install, and run the main job (ends serving the site)
#   make test   create the virtual environment, install, and run the whole test suite
# The documentation site:
#   make site   set up, re-measure missing or stale results (CPU), build site_build/ (exits 1 on failure)
#   make serve  the same, then serve site_build/ on http://127.0.0.1:$(PORT)/
# torch is installed first with its pin (a plain `torch` requirement pulls a multi-GB CUDA build).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PORT   ?= 8000

.PHONY: setup run test lint clean site serve

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,docs]"
	touch $(STAMP)

run: setup
	$(PY) -m catalog list
	$(PY) -m catalog site --serve --port $(PORT)

lint: setup
	$(VENV)/bin/ruff check catalog implementations kernels tests benchmarks
	$(PY) -m catalog schema --check
	$(PY) -m catalog validate

test: lint
	$(PY) -m pytest -q

site: setup
	$(PY) -m catalog site

serve: setup
	$(PY) -m catalog site --serve --port $(PORT)

clean:
	rm -rf $(VENV) build site_build .pytest_cache .ruff_cache .hypothesis

# Each target builds .venv on first use (pip install -e ".[dev]").
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8888

.PHONY: lab test notebooks sample-data bench lint

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab --port=$(PORT) notebooks/01_explore_dataset.ipynb $(LAB_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check vprlib tests bench data hubconf.py

test: lint
	$(PY) -m pytest tests --nbval-lax notebooks -p no:cacheprovider $(PYTEST_ARGS)

notebooks: $(VENV)/.installed
	mkdir -p figures
	$(PY) -m vprlib.run_notebooks notebooks

sample-data: $(VENV)/.installed
	$(PY) data/make_sample.py --out data/sample

bench: $(VENV)/.installed
	$(PY) bench/loader.py
	$(PY) bench/dataframes.py
	$(PY) bench/search.py

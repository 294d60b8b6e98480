# vprlib: every target builds .venv on first use (pip install -e ".[dev]" with constraints.txt).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8888
LAB_ARGS ?=
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)
TEST_PATHS ?= tests notebooks
PYTEST_ARGS ?=
NOTEBOOK_ARGS ?=
SAMPLE_OUT ?= data/sample
# torch's CUDA build makes .venv about 6.3 GB; check the disk first for a clear error
MIN_FREE_GB ?= 7

.PHONY: lab test lint notebooks sample-data bench

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -c "import shutil, sys; free = shutil.disk_usage('.').free / 2**30; \
	  sys.exit(0 if free >= $(MIN_FREE_GB) else f'make: {free:.1f} GB free on the disk of $(CURDIR); ' \
	  f'building $(VENV) (torch CUDA build) needs about $(MIN_FREE_GB) GB. Free some space, or set MIN_FREE_GB.')"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

## make lab: JupyterLab on the first notebook (the main way in)
lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab --port=$(PORT) $(ROOT_FLAG) $(LAB_ARGS) notebooks/01_explore_dataset.ipynb

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check vprlib tests bench data hubconf.py

## make test: ruff, then every test and every notebook (nbval) on the sample
test: lint
	$(PY) -m pytest $(TEST_PATHS) --nbval-lax --nbval-cell-timeout=1200 -p no:cacheprovider $(PYTEST_ARGS)

## make notebooks: run all notebooks in order, headless, refreshing figures/
notebooks: $(VENV)/.installed
	$(PY) -m vprlib.run_notebooks notebooks $(NOTEBOOK_ARGS)

## make sample-data: regenerate data/sample deterministically
sample-data: $(VENV)/.installed
	$(PY) data/make_sample.py --out $(SAMPLE_OUT)

## make bench: the CPU performance scripts (see bench/RESULTS.md)
bench: $(VENV)/.installed
	$(PY) bench/loader.py
	$(PY) bench/dataframes.py
	$(PY) bench/search.py

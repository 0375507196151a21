# Two entry points: `make book` and `make test`. Both set up .venv first (nothing but Python
# is needed on the machine). Use PYTHON=python3.12 to choose the interpreter.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
JOBS   ?= 2
export PYTHONUNBUFFERED := 1

.PHONY: all book test lint setup clean paper help export
all: help

help:
	@echo "make book   - set up .venv, execute every chapter (quick profile, CPU, offline), build HTML"
	@echo "make test   - set up .venv, run lint, unit tests, notebook smoke runs and a tiny book build"
	@echo "make paper  - execute the paper profile (needs the data sets in DATA_DIR; meant for a GPU)"
	@echo "make export - write nbutils/methods/*.py from the notebooks' #| export cells"
	@echo "make clean  - remove build outputs and quick-profile runs (keeps .venv and data)"

setup: $(STAMP)

# torch and torchvision>=0.29 come from the package registry; the kernel is registered inside
# the venv so papermill finds this interpreter on a machine that has no Jupyter set up.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (anomaly book)"
	touch $(STAMP)

book: $(STAMP)
	$(PY) -m nbutils.pipeline --profile quick --jobs $(JOBS)
	$(PY) -m nbutils.book

paper: $(STAMP)
	$(PY) -m nbutils.pipeline --profile paper --jobs $(JOBS)
	$(PY) -m nbutils.book

# the chapters' `#| export` cells -> nbutils/methods/*.py (make test fails when they are stale)
export: $(STAMP)
	$(PY) -m nbutils.export

lint: $(STAMP)
	$(PY) -m ruff check .

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf _build book/generated book/runs/quick book/runs/smoke

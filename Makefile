# hpcdl: everything from nothing. `make demo` and `make test` are the two commands a new user runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RANKS ?= 4

.PHONY: install demo test lint format bench clean

include slurm/local/slurm.mk

install: $(STAMP)

# torch first, pinned, so nothing pulls a multi-GB CUDA build; then the package with the MPICH wheel.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[mpich,datasets,plots,dev]'
	touch $@

datasets/digits.h5: | $(STAMP)
	$(PY) -m hpcdl data make digits --out $@

demo: $(STAMP) datasets/digits.h5
	PATH=$(CURDIR)/$(BIN):$$PATH mpirun -n $(RANKS) $(PY) -m hpcdl train --config digits-mlp

test: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(PY) -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check hpcdl tests
	$(BIN)/ruff format --check hpcdl tests

format: $(STAMP)
	$(BIN)/ruff format hpcdl tests
	$(BIN)/ruff check --fix hpcdl tests

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info datasets/*.h5

bench: $(STAMP)
	mkdir -p runs
	PATH=$(CURDIR)/$(BIN):$$PATH $(PY) -m hpcdl bench allreduce --json runs/bench-allreduce.json
	PATH=$(CURDIR)/$(BIN):$$PATH $(PY) -m hpcdl bench dp --json runs/bench-dp.json

# hpcdl: everything from nothing. `make demo` and `make test` are the two commands a new user runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RANKS ?= 4

.PHONY: install demo test lint format bench scale clean

include slurm/local/slurm.mk
include slurm/cluster/cluster.mk

install: $(STAMP)

# torch first, pinned, so nothing pulls a multi-GB CUDA build; then the package with the MPICH wheel.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[mpich,datasets,plots,tensorboard,dev]'
	touch $@

datasets/digits.h5: | $(STAMP)
	$(PY) -m hpcdl data make digits --out $@

# --overwrite: a second `make demo` trains afresh; the previous demo run is moved aside, never deleted.
demo: $(STAMP) datasets/digits.h5
	PATH=$(CURDIR)/$(BIN):$$PATH mpirun -n $(RANKS) $(PY) -m hpcdl train --config digits-mlp --overwrite

test: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(PY) -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check hpcdl tests
	$(BIN)/ruff format --check hpcdl tests
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format hpcdl tests
	$(BIN)/ruff check --fix hpcdl tests

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info datasets/*.h5

# Every benchmark: peer and hpcdl side by side, figures in runs/bench-*.json (see README, Performance).
BENCH = PATH=$(CURDIR)/$(BIN):$$PATH $(PY) -m hpcdl bench
bench: $(STAMP)
	mkdir -p runs
	$(BENCH) allreduce --json runs/bench-allreduce.json --overwrite
	$(BENCH) dp --json runs/bench-dp.json --overwrite
	$(BENCH) pipeline --json runs/bench-pipeline.json --overwrite
	$(BENCH) pipeline --batch 1024 --json runs/bench-pipeline-b1024.json --overwrite
	$(BENCH) io --json runs/bench-io.json --overwrite
	$(BENCH) infer --json runs/bench-infer.json --overwrite
	$(BENCH) comm --json runs/bench-comm.json --overwrite
	$(BENCH) strategies --json runs/bench-strategies.json --overwrite
	$(BENCH) zero --json runs/bench-zero.json --overwrite

# The README's scaling study: MLP and CNN at 1 and 2 ranks, then tables, plots and a projection in docs/scaling.
SCALE_RUN = PATH=$(CURDIR)/$(BIN):$$PATH $(PY) -m hpcdl scale run --ranks 1,2 --repeats 3 --no-report
scale: $(STAMP)
	$(PY) -m hpcdl data make synthetic --n 20000 --no-progress --overwrite --out datasets/scale-synthetic.h5
	$(PY) -m hpcdl data make images --n 3000 --no-progress --overwrite --out datasets/scale-images.h5
	rm -rf runs/scale-mlp runs/scale-cnn
	$(SCALE_RUN) --config synthetic-mlp --set data.path=datasets/scale-synthetic.h5 --steps 30 --warmup 5 --out runs/scale-mlp
	$(SCALE_RUN) --config images-cnn --set data.path=datasets/scale-images.h5 --steps 20 --warmup 3 --out runs/scale-cnn
	PATH=$(CURDIR)/$(BIN):$$PATH $(PY) -m hpcdl bench comm --json docs/scaling/comm.json --overwrite
	$(PY) -m hpcdl scale report runs/scale-mlp runs/scale-cnn --out docs/scaling
	$(PY) -m hpcdl scale project --study runs/scale-mlp --comm docs/scaling/comm.json --out docs/scaling

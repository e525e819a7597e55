# `make run` and `make test` set everything up on a fresh machine (a .venv at the repo root).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: install run test test-slow test-full bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: install
	$(PY) -m cl_inversion $(ARGS)

# the fast tier; test-slow: the longer end-to-end runs (marked slow); test-full: both (what CI runs)
test: install
	WANDB_MODE=offline $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: install
	WANDB_MODE=offline $(PY) -m pytest -m slow $(PYTEST_ARGS)

test-full: test test-slow

bench: install
	$(PY) -m benchmarks.run_all

lint: install
	$(PY) -m ruff check cl_inversion tests benchmarks docs/experiments/analysis

clean:
	rm -rf outputs/ multirun/ lightning_logs/ wandb/

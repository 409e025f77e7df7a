# raydpo: the two fresh-machine commands are `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
RAYDPO := $(VENV)/bin/raydpo
PYTEST_ARGS ?=

.PHONY: install demo test test-fast bench-tokenize clean

install: $(VENV)/.installed

# torch is installed first, pinned to the CPU build this machine carries, so that no later
# requirement resolves to a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

runs/tiny-model/config.json: | install
	$(RAYDPO) tiny-model runs/tiny-model

runs/data/train.jsonl: | install
	$(RAYDPO) synthetic-data runs/data

# The demo: the tiny model learns the synthetic task on an embedded local Ray cluster
# (2 Ray Train workers, DeepSpeed ZeRO-2 on gloo); the run lands in runs/demo/.
demo: install runs/tiny-model/config.json runs/data/train.jsonl
	$(RAYDPO) train examples/tiny.yaml

test: install
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q $(PYTEST_ARGS)

# The suite without the long DeepSpeed training runs.
test-fast: install
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Tokenization throughput against TRL's DPOTrainer data preparation (needs ../shared/data).
bench-tokenize: install
	$(PY) bench/tokenize_vs_trl.py

clean:
	rm -rf runs .pytest_cache

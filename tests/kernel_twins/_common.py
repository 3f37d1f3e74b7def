"""What every kernel test module shares: the module is skipped where the triton backend cannot run."""

import pytest
import torch

from unipruning import backends

pytest.importorskip("triton")
if not backends.available()["triton"][0]:
    pytest.skip(f"triton backend unavailable: {backends.available()['triton'][1]}", allow_module_level=True)

from unipruning.kernels import triton_backend as T  # noqa: E402, F401

SHAPES = [(1, 4), (7, 12), (33, 1000), (130, 257)]


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"

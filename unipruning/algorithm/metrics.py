"""The local metrics S(W, X) that anchor the saliency (docs/method.md, "Local metrics"): the keys of their
stochria subsets and the per-step activation statistics they read.

The metrics themselves (name, channel exponent, how S is formed) are the registry of
kernels/metric_registry.py (`ops.REGISTRY`); the kernels never build S for the mirror update: they compute
per-step vectors (row_inv, col_inv, col_scale) in float64 so that S = (|W| * (row_inv + col_inv)) *
col_scale (or |W| * col_scale), with the mean folded into col_scale, and evaluate that elementwise in
float32 (`ops.step_vectors`). The formula written out (`metric_score` of kernels/reference.py, the oracle)
is what tests/kernel_twins/test_metrics.py holds the kernels' S to.
"""

from __future__ import annotations

import zlib

import torch

from .. import ops


def matrix_id(name: str) -> int:
    """A stable 32-bit id of a matrix name (keys the stochria subsets; the same on every backend)."""
    return zlib.crc32(name.encode())


def step_key(seed: int, name: str, step: int) -> int:
    """The key of matrix `name`'s stochria subsets at calibration step `step` (global step index, so
    every resume and every data-parallel rank draws the same subsets)."""
    return ops.derive_key(seed, matrix_id(name), step)


class ActivationStats:
    """sum of x^2 (float64) and the token count of one input over the tokens of the current step."""

    def __init__(self, features: int, device: torch.device, backend: str | None):
        self.sqsum = torch.zeros(features, dtype=torch.float64, device=device)
        self.tokens = 0
        self.backend = backend

    def add(self, x: torch.Tensor) -> None:
        self.tokens += ops.act_sqsum_(self.sqsum, x.detach(), backend=self.backend)

    def reset(self) -> None:
        self.sqsum.zero_()
        self.tokens = 0

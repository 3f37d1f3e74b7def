"""The local metrics S(W, X) that anchor the saliency (docs/method.md, "Local metrics").

For a prunable matrix W (out, in) and the tokens of one calibration step, with n_j = E_tokens[x_j^2]:

    magnitude  S_ij = |W_ij|
    wanda      S_ij = |W_ij| * n_j^0.5
    ria        S_ij = (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) * n_j^0.25
    stochria   S_ij = (|W_ij| / colsub_j + |W_ij| / rowsub_i) * n_j^0.35

where rowsub_i / colsub_j sum |W| over keyed random subsets of exactly tau = max(1, floor(0.2 min(out,
in))) entries of row i / column j (new subsets every step, keyed on seed, matrix and step), both clamped
below at 1e-12; then S is normalised to mean 1 over the matrix. `reference_score` below is that formula
written out, in float64: the tests hold the kernels to it. The kernels never build S for the mirror
update: they compute per-step vectors (row_inv, col_inv, col_scale) in float64 so that
S = (|W| * (row_inv + col_inv)) * col_scale (or |W| * col_scale), with the mean folded into col_scale,
and evaluate that elementwise in float32 (`ops.step_vectors`, kernels/reference.py).
"""

from __future__ import annotations

import zlib

import torch

from .. import ops
from ..ops import RIA_EXPONENT, STOCHRIA_EXPONENT, SUM_FLOOR

CHANNEL_EXPONENT = {"magnitude": 0.0, "wanda": 0.5, "ria": RIA_EXPONENT, "stochria": STOCHRIA_EXPONENT}


def reference_score(metric: str, weight: torch.Tensor, act_sqmean: torch.Tensor | None,
                    row_sum: torch.Tensor | None = None, col_sum: torch.Tensor | None = None) -> torch.Tensor:
    """S (out, in) float64, normalised to mean 1: the formula of each metric, written for reading.
    act_sqmean: n_j (in,); row_sum/col_sum: the normalisers of ria (full sums, the default) or stochria
    (the subset sums of `ops.stochastic_subset_sums`)."""
    a = weight.abs().to(torch.float64)
    factor = torch.ones(a.shape[1], dtype=torch.float64) if metric == "magnitude" else \
        act_sqmean.to(torch.float64).pow(CHANNEL_EXPONENT[metric])
    if metric in ("magnitude", "wanda"):
        score = a * factor
    else:
        rows = (a.sum(dim=1) if row_sum is None else row_sum).clamp_min(SUM_FLOOR)
        cols = (a.sum(dim=0) if col_sum is None else col_sum).clamp_min(SUM_FLOOR)
        score = (a / cols[None, :] + a / rows[:, None]) * factor
    return score / score.mean()


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

"""The orchestrator's only door to compute: one entry point per kernel, dispatched per call.

Every function takes `backend=`: a name from `unipruning.backends` or None/"auto" (then
$UNIPRUNING_BACKEND, else triton for tensors on a GPU and torch otherwise), and forwards to that
backend's implementation, which has the signature of its torch twin in kernels/reference.py. The
kernels' shared, backend-independent pieces (the key derivation of the stochria subsets, the metric
constants, the Cholesky factor of the OBS reconstruction) are re-exported here too, so that nothing
above this module imports a kernel file.
"""

from __future__ import annotations

import torch

from . import backends
from .kernels.reference import (  # noqa: F401  (re-exported: backend-independent, shared by every backend)
    METRICS,
    RIA_EXPONENT,
    STOCHRIA_BETA,
    STOCHRIA_EXPONENT,
    SUM_FLOOR,
    channel_factor,
    derive_key,
    finish_step_vectors,
    obs_inverse_factor,
    stochastic_subset_sums,
    stochria_tau,
)
from .kernels.refine_twin import transfer_  # noqa: F401  (the matrix budget's moves between rows: torch, shared)


def _impl(backend: str | None, tensor: torch.Tensor):
    return backends.implementation(backends.resolve(backend, tensor.device))


def act_sqsum_(sqsum: torch.Tensor, x: torch.Tensor, backend: str | None = None) -> int:
    """sqsum (in,) float64 += sum_tokens x^2 for x (..., in); returns the token count."""
    return _impl(backend, x).act_sqsum_(sqsum, x)


def step_vectors(weight, act_sqsum, tokens, metric, base_key=0, backend: str | None = None):
    """(row_inv, col_inv, col_scale) float32 of one mirror step; see kernels/reference.py. Every
    backend finishes its sums with the same float64 torch code: masks then agree."""
    return _impl(backend, weight).step_vectors(weight, act_sqsum, tokens, metric, base_key)


def mirror_step_(z, weight, row_inv, col_inv, col_scale, kappa, threshold, m, hint=-1,
                 backend: str | None = None) -> tuple[float, int]:
    """z <- z + kappa * (S - max(z - threshold, 0)) in place, then the exact m-th smallest z: returns
    (new threshold, a hint that speeds up the next step's selection in a fused kernel)."""
    return _impl(backend, z).mirror_step_(z, weight, row_inv, col_inv, col_scale, kappa, threshold, m, hint)


def rank_keys(z: torch.Tensor, weight: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    return _impl(backend, z).rank_keys(z, weight)


def topk_mask(keys: torch.Tensor, k: int, backend: str | None = None) -> torch.Tensor:
    return _impl(backend, keys).topk_mask(keys, k)


def row_topk_mask(keys: torch.Tensor, k: int, backend: str | None = None) -> torch.Tensor:
    return _impl(backend, keys).row_topk_mask(keys, k)


def nm_mask(keys: torch.Tensor, n: int, m: int, backend: str | None = None) -> torch.Tensor:
    return _impl(backend, keys).nm_mask(keys, n, m)


def global_keep_counts(keys, total_keep, lower, upper, backend: str | None = None) -> list[int]:
    return _impl(backend, keys[0]).global_keep_counts(keys, total_keep, lower, upper)


def hessian_accumulate_(h: torch.Tensor, x: torch.Tensor, backend: str | None = None) -> None:
    """h (in, in) float32 += x^T x over the tokens of x (..., in)."""
    _impl(backend, x).hessian_accumulate_(h, x)


def obs_sweep_(w, u, keep=None, prune_count=None, nm=None, blocksize=128, prior=None, backend: str | None = None):
    """The lazy-batch OBS sweep, in place on w (float32); returns the keep mask (kernels/reference.py).
    prior: multiplies the score of the mask-choosing rule (keep None)."""
    return _impl(backend, w).obs_sweep_(w, u, keep, prune_count, nm, blocksize, prior)


def refine_rows_(keep, r, w, gram, iters: int, backend: str | None = None) -> torch.Tensor:
    """Up to `iters` mask swaps in every row of w (float32), in place on keep (bool) and the residual r;
    returns the swaps per row (kernels/refine_twin.py)."""
    return _impl(backend, w).refine_rows_(keep, r, w, gram, iters)


def refine_nm_(keep, r, w, gram, m: int, iters: int, backend: str | None = None) -> torch.Tensor:
    """As refine_rows_, each swap inside one group of m consecutive entries of a row."""
    return _impl(backend, w).refine_nm_(keep, r, w, gram, m, iters)

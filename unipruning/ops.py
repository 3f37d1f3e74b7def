"""The orchestrator's only door to compute: one entry point per kernel, dispatched per call.

Every function takes `backend=`: a name from `unipruning.backends` or None/"auto" (then
$UNIPRUNING_BACKEND, else triton for tensors on a GPU and torch otherwise), and forwards to that
backend's implementation, which has the signature of its torch twin in kernels/reference.py. The
kernels' shared, backend-independent pieces (the metric registry, the key derivation of the stochria
subsets, the float64 finish of the step vectors, the Cholesky factor of the OBS reconstruction) are
re-exported here too, so that nothing above this module imports a kernel file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import backends
from .kernels.metric_registry import METRICS, REGISTRY, SUM_FLOOR, Metric, metric_spec, stochria_tau  # noqa: F401
from .kernels.shared import (  # noqa: F401  (re-exported: backend-independent, shared by every backend)
    Candidates,
    StepVectors,
    channel_factor,
    derive_key,
    finish_step_vectors,
    obs_inverse_factor,
    stochastic_subset_sums,
)


def _impl(backend: str | None, tensor: torch.Tensor):
    return backends.implementation(backends.resolve(backend, tensor.device))


def act_sqsum_(sqsum: torch.Tensor, x: torch.Tensor, backend: str | None = None) -> int:
    """sqsum (in,) float64 += sum_tokens x^2 for x (..., in); returns the token count."""
    return _impl(backend, x).act_sqsum_(sqsum, x)


def step_vectors(weight, act_sqsum, tokens, metric, base_key=0, backend: str | None = None) -> StepVectors:
    """(row_inv, col_inv, col_scale) float32 of one mirror step; see kernels/reference.py. Every
    backend finishes its sums with the same float64 torch code: masks then agree."""
    return _impl(backend, weight).step_vectors(weight, act_sqsum, tokens, metric, base_key)


def mirror_step_(z: torch.Tensor, weight: torch.Tensor, vectors: StepVectors, kappa: float, m: int,
                 previous: tuple[float, int] = (0.0, -1), backend: str | None = None) -> tuple[float, int]:
    """z <- z + kappa * (S - max(z - t, 0)) in place, S from the step's `vectors`, then the exact m-th
    smallest z. `previous`: what the last step returned, (t, hint) ((0.0, -1) before the first); returns
    the new (t, hint); the hint only speeds up the next step's selection in a fused kernel."""
    threshold, hint = previous
    return _impl(backend, z).mirror_step_(z, weight, *vectors, kappa, threshold, m, hint)


def candidate_step_(candidates: Candidates, vectors: StepVectors, kappa: float, m: int,
                    previous: tuple[float, int] = (0.0, -1), backend: str | None = None) -> tuple[float, int]:
    """The mirror step of a matrix's candidate entries (the closed form's): their z updated in place from
    S gathered at their rows and columns of the step's `vectors`, then the exact m-th smallest of their z;
    `previous` and the result as in `mirror_step_`."""
    threshold, hint = previous
    c = candidates
    return _impl(backend, c.z).candidate_step_(c.z, c.a, c.rows, c.cols, *vectors, kappa, threshold, m, hint)


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


@dataclass(frozen=True)
class SweepRule:
    """Which entries the OBS sweep prunes: a given `keep` mask, or SparseGPT's rule choosing during the
    sweep, `prune_count` entries in all (per block) or the m - n smallest of every N:M group (`nm`), its
    score w^2 / U_ii^2 multiplied by `prior` when given."""

    keep: torch.Tensor | None = None
    prune_count: int | None = None
    nm: tuple[int, int] | None = None
    prior: torch.Tensor | None = None


def obs_sweep_(w: torch.Tensor, u: torch.Tensor, rule: SweepRule, blocksize: int = 128,
               backend: str | None = None) -> torch.Tensor:
    """The lazy-batch OBS sweep, in place on w (float32); returns the keep mask (kernels/reference.py)."""
    return _impl(backend, w).obs_sweep_(w, u, rule.keep, rule.prune_count, rule.nm, blocksize, rule.prior)

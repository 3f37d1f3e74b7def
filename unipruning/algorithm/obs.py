"""Weight reconstruction of one matrix (docs/method.md, "Reconstruction"): SparseGPT's lazy-batch OBS sweep.

Given H = 2/n X^T X of the matrix's input (float32), dampened by `damp` of its mean diagonal (DAMP, SparseGPT's
--percdamp), U = the upper Cholesky factor of H^-1 (`ops.obs_inverse_factor`), the sweep walks the columns in
blocks of `blocksize` (BLOCKSIZE, SparseGPT's --blocksize):
each column's pruned entries are zeroed and their error, divided by U_ii, is subtracted from the later
columns along U's row (`ops.obs_sweep_`). With a mask given the sweep keeps it; without (the `sparsegpt`
metric) it chooses, per block, the entries of smallest w^2 / U_ii^2 (for N:M, the M-N smallest of each
group as the sweep reaches it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .. import ops
from ..config import BLOCKSIZE as _BLOCKSIZE
from ..config import DIAG_DAMP, PERCDAMP, MaskSpec
from .masks import keep_count

log = logging.getLogger("unipruning")

DAMP = PERCDAMP  # fraction of the mean Hessian diagonal added to it (SparseGPT's default)
DAMP_RETRIES = 6  # each retry dampens ten times more
BLOCKSIZE = _BLOCKSIZE  # columns per lazy batch


@dataclass(frozen=True)
class ObsSettings:
    """The knobs of the sweep and of the pass around it (validated by PruneConfig / MaskConfig)."""

    damp: float = DAMP
    blocksize: int = BLOCKSIZE
    true_sequential: bool = True  # each group's Hessian from the block as reconstructed so far
    diag_damp: float = DIAG_DAMP  # `dampen_diagonal`'s strength


def dampen_diagonal(h: torch.Tensor, strength: float) -> torch.Tensor:
    """H + strength * Diag(H): each input dampened in proportion to its own energy (the mean-diagonal `damp`
    is negligible beside the outlier channels of an LLM and dominant beside its quiet ones). A ridge on
    the update that charges each kept weight's change by the output energy it moves, i.e. H shrunk toward
    its diagonal (the inputs' correlations, which a calibration text of another domain does not share,
    count 1 / (1 + strength) as much; strength -> inf leaves the mask with no update, chosen by Wanda's
    w^2 H_ii). benchmarks/results/obs-generalize-*.md measures why and how much. A new tensor; 0 returns h."""
    if strength == 0:
        return h
    out = h.clone()
    out.diagonal().mul_(1.0 + strength)
    return out


def inverse_factor(h: torch.Tensor, name: str, damp: float = DAMP) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(U, dead inputs) of the Hessian dampened by `damp`; dampening ten times more, with a logged warning,
    while the factorisation fails; U None (also logged) when it never succeeds (non-finite activations)."""
    for attempt in range(DAMP_RETRIES + 1):
        u, dead = ops.obs_inverse_factor(h, damp)
        if u is not None:
            if attempt:
                log.warning("%s: the Hessian needed dampening %.3g (Cholesky failed at %.3g)", name, damp, damp / 10)
            return u, dead
        damp *= 10
    log.warning("%s: the Hessian could not be factorised even with dampening %.3g; masked without "
                "reconstruction", name, damp / 10)
    return None, dead


def sweep_rule(spec: MaskSpec, numel: int, keep: torch.Tensor | None = None, prior: torch.Tensor | None = None,
               kept: int | None = None) -> ops.SweepRule:
    """What the sweep of a matrix of `numel` entries prunes: the mask `keep` when given; else SparseGPT's
    rule under `spec`, N:M or a count per matrix (`kept`, when a cross-block allocation settled it, else
    the spec's sparsity), its score times `prior` if given."""
    if keep is not None:
        return ops.SweepRule(keep=keep)
    if spec.nm is not None:
        return ops.SweepRule(nm=spec.nm, prior=prior)
    return ops.SweepRule(prune_count=numel - (keep_count(spec.sparsity, numel) if kept is None else kept),
                         prior=prior)


def guide_prior(z: torch.Tensor, weight: torch.Tensor, alpha: float, backend: str | None) -> torch.Tensor:
    """(rank of each entry under the saliency's order / numel)^alpha, float32 in (0, 1]: multiplied into
    SparseGPT's score w^2 / U_ii^2, it makes the entries the saliency ranks low cheaper to prune."""
    keys = ops.rank_keys(z.to(weight.device), weight, backend=backend).reshape(-1)
    rank = torch.empty(keys.numel(), dtype=torch.float64, device=keys.device)
    rank[keys.argsort(stable=True)] = torch.arange(1, keys.numel() + 1, dtype=torch.float64, device=keys.device)
    return (rank / keys.numel()).pow(alpha).to(torch.float32).reshape(weight.shape)


def reconstruct_weight(weight: torch.Tensor, h: torch.Tensor, rule: ops.SweepRule, name: str,
                       settings: ObsSettings | None = None, backend: str | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstructed weight in float32, keep mask): kept entries updated, pruned ones +0.0. The mask is
    `rule.keep`, or chosen during the sweep by SparseGPT's rule (`sweep_rule`); settings: dampening (the
    mean-diagonal `damp`, and `diag_damp` through `dampen_diagonal`) and block size (default SparseGPT's)."""
    settings = settings or ObsSettings()
    w = weight.to(torch.float32, copy=True)
    u, dead = inverse_factor(dampen_diagonal(h, settings.diag_damp), name, settings.damp)
    if u is None:
        if rule.keep is not None:
            return torch.where(rule.keep, w, 0.0), rule.keep
        u = torch.eye(w.shape[1], dtype=torch.float32, device=w.device)  # no curvature: rank by magnitude
    w[:, dead] = 0.0
    keep = ops.obs_sweep_(w, u, rule, blocksize=settings.blocksize, backend=backend)
    return w, keep

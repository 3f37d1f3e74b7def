"""Swap refinement of a keep mask (docs/method.md, "Refinement"): weights unchanged, the mask improved
inside its budget groups by swapping a pruned and a kept entry whenever that lowers the layer's output
error ||((1 - M) * W) X||^2 = sum over rows of d G d^T (d: the row's pruned entries, G = X^T X of the
calibration inputs X, tokens x in).

With the residual r = d G (one matmul), each candidate swap's change of the error is closed form (the
pair's cross term G_pq included), O(in) to find and O(in) to apply (kernels/refine_twin.py states the
rule). Budgets kept exactly:
- `row` (allocation row, owl-row): swaps inside each output row;
- `N:M`: swaps inside each group of M consecutive entries of a row (every group keeps its count);
- `matrix` (layer, global, owl: whatever decided the matrix's count, global's bounds included): per-row
  swaps, and kept slots moved from one row to another when that lowers the error (`ops.transfer_`).
`iters` bounds the swaps per row (per-row passes for `matrix`, each with one round of moves); a row stops
earlier at a mask no single swap improves. The same inputs give the same mask on every backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..config import MaskSpec, parse_pattern
from ..errors import UsageError


@dataclass(frozen=True)
class Refined:
    """The refined keep mask, the output error before and after (float64 sums over rows of d G d^T),
    and the swaps made (moves between rows count as swaps too)."""

    keep: torch.Tensor
    error_before: float
    error_after: float
    swaps: int


def output_error(weight: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor) -> float:
    """||((1 - M) * W) X||^2 = sum over rows of d G d^T, in float64."""
    d = torch.where(keep, 0.0, weight.double())
    return float(((d @ gram.double()) * d).sum())


def swap_gains(weight: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """The closed form written out (float64, every pair: for tests and reading): (out, in, in), entry
    [i, p, q] the change of row i's output error when its pruned p is kept and its kept q pruned,
    a_p + b_q - 2 w_p w_q G_pq with r = d G, a_p = w_p^2 G_pp - 2 w_p r_p, b_q = w_q^2 G_qq + 2 w_q r_q;
    +inf where p is kept or q pruned."""
    w, g = weight.double(), gram.double()
    r = torch.where(keep, 0.0, w) @ g
    w2g = w * w * g.diagonal()
    a = torch.where(keep, torch.inf, w2g - 2 * w * r)
    b = torch.where(keep, w2g + 2 * w * r, torch.inf)
    return a[:, :, None] + b[:, None, :] - 2 * w[:, :, None] * w[:, None, :] * g


def _check(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, iters: int) -> None:
    if weight.dim() != 2 or keep.shape != weight.shape or keep.dtype != torch.bool:
        raise ValueError(f"need a 2-D weight and a bool keep mask of its shape, got {tuple(weight.shape)} and "
                         f"{keep.dtype} {tuple(keep.shape)}")
    cols = weight.shape[1]
    if gram.shape != (cols, cols) or gram.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"gram must be float32/64 ({cols}, {cols}), got {gram.dtype} {tuple(gram.shape)}")
    if not (isinstance(iters, int) and not isinstance(iters, bool) and iters >= 0):
        raise UsageError(f"`refine_iters`: expected a non-negative integer, got {iters!r}")
    if not (bool(torch.isfinite(weight).all()) and bool(torch.isfinite(gram).all())):
        raise ValueError("weight and gram must be finite")


def _group_size(budget: str, cols: int) -> int | None:
    """M of an N:M budget (None for row/matrix); checks the budget."""
    if budget in ("row", "matrix"):
        return None
    nm = parse_pattern(budget) if isinstance(budget, str) and ":" in budget else None
    if nm is None:
        raise UsageError(f"refinement budget: expected row, matrix or N:M, got {budget!r}")
    if cols % nm[1] or nm[1] > 16:
        raise UsageError(f"refinement budget {budget}: in_features {cols} is not a multiple of M (M <= 16)")
    return nm[1]


def budget_of(spec: MaskSpec) -> str:
    """The budget group a mask cut under `spec` keeps: "N:M", row (row, owl-row) or matrix (the others)."""
    nm = spec.nm
    if nm is not None:
        return f"{nm[0]}:{nm[1]}"
    return "row" if spec.per_row else "matrix"


def refine_mask(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, budget: str, iters: int,
                backend: str | None = None) -> Refined:
    """Refine `keep` (bool, W's shape) for W (out, in) and G = X^T X (in, in) under `budget` (row, matrix
    or "N:M"), at most `iters` swaps per row. Computes in float32 on W's device (G symmetrised); `keep`
    is not modified. The errors are float64 sums under that G."""
    _check(weight, gram, keep, iters)
    m = _group_size(budget, weight.shape[1])
    w = weight.to(torch.float32).contiguous()
    g = gram.to(device=w.device, dtype=torch.float32)
    g = ((g + g.T) * 0.5).contiguous()  # a float32 X^T X is symmetric only to rounding; the gains assume it
    new = keep.to(w.device).clone().contiguous()
    before = output_error(w, new, g)
    r = torch.where(new, 0.0, w) @ g
    if m is not None:
        swaps = int(ops.refine_nm_(new, r, w, g, m, iters, backend=backend).sum())
    elif budget == "row":
        swaps = int(ops.refine_rows_(new, r, w, g, iters, backend=backend).sum())
    else:
        swaps = _refine_matrix_(new, r, w, g, iters, backend)
    after = output_error(w, new, g)
    if not after <= before:  # float32 gains within rounding of zero can mislead: never return a worse mask
        return Refined(keep=keep.to(w.device).clone(), error_before=before, error_after=before, swaps=0)
    return Refined(keep=new, error_before=before, error_after=after, swaps=swaps)


def _refine_matrix_(keep: torch.Tensor, r: torch.Tensor, w: torch.Tensor, g: torch.Tensor, iters: int,
                    backend: str | None) -> int:
    """The matrix budget: rounds of one per-row swap pass and one round of moves between rows."""
    swaps = 0
    for _ in range(iters):
        within = int(ops.refine_rows_(keep, r, w, g, 1, backend=backend).sum())
        moved = ops.transfer_(keep, r, w, g)
        swaps += within + moved
        if within == 0 and moved == 0:
            break
    return swaps

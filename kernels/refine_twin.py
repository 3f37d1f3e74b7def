"""Torch twins of the swap-refinement kernels (kernels/refine.py): the CPU path and the kernels' oracle.

One row w of a matrix W (out, in), its keep mask, G = X^T X (in, in) of the layer's inputs and the
residual r (docs/method.md, "Refinement"; unipruning/algorithm/refine.py makes r). Un-pruning a pruned p
changes the row's output error by a_p = w_p^2 G_pp - 2 w_p r_p, pruning a kept q by
b_q = w_q^2 G_qq + 2 w_q r_q, swapping both by a_p + b_q - 2 w_p w_q G_pq. One iteration of a row:

- `refine_rows_`: p = the pruned entry of least a (lowest index on ties), q = its best partner, the kept
  entry of least c_q = b_q - 2 w_p w_q G_pq; swap when a_p + c_q < 0. O(in) per swap.
- `refine_nm_`: every (pruned, kept) pair inside every group of m consecutive entries, scored
  a_p + (b_q - 2 w_p w_q G_pq); the least of the row (lowest flat index (group, p, q) on ties) swaps when
  negative. Each group keeps its count.

A swap updates r <- (r - w_p G_p) + w_q G_q. A row stops at its first iteration without a swap (its
state, hence its choice, would not change again), or after `iters`. Arithmetic contract (the kernels
follow it operation for operation, launched without fused multiply-add): float32, every product
rounded, t = (w r) 2, a = (w w) G_jj - t, b = (w w) G_jj + t, the pair term ((2 w_p) w_q) G_pq
subtracted from b_q before a_p is added, argmin ties to the lowest index.
"""

from __future__ import annotations

import torch

from .shared import check_refine_args

INF = float("inf")


def _scores(w: torch.Tensor, r: torch.Tensor, w2g: torch.Tensor, keep: torch.Tensor):
    t = (w * r) * 2
    return (w2g - t).masked_fill_(keep, INF), (w2g + t).masked_fill_(~keep, INF)


class _Active:
    """The rows still swapping, compacted (w, w^2 G_jj, keep, r and their row numbers): a row leaves at its
    first iteration without a swap and its keep and r are written back then (or at the end)."""

    def __init__(self, keep, r, w, gram):
        self.keep_out, self.r_out = keep, r
        self.rows = torch.arange(w.shape[0], device=w.device)
        self.w, self.w2g = w, (w * w) * gram.diagonal()
        self.keep, self.r = keep.clone(), r.clone()

    def retire(self, ok: torch.Tensor) -> None:
        """Write back the rows where `ok` is False, keep the others."""
        if bool(ok.all()):
            return
        done = self.rows[~ok]
        self.keep_out[done], self.r_out[done] = self.keep[~ok], self.r[~ok]
        self.rows, self.w, self.w2g, self.keep, self.r = (t[ok] for t in (self.rows, self.w, self.w2g, self.keep,
                                                                          self.r))

    def swap(self, gram, p, q, wp, gp) -> None:
        """Un-prune p and prune q in every active row: r <- (r - w_p G_p) + w_q G_q."""
        at = torch.arange(self.rows.numel(), device=self.w.device)
        self.keep[at, p] = True
        self.keep[at, q] = False
        self.r = (self.r - wp * gp) + self.w[at, q][:, None] * gram[q]

    def finish(self) -> None:
        self.retire(torch.zeros_like(self.rows, dtype=torch.bool))


def refine_rows_(keep: torch.Tensor, r: torch.Tensor, w: torch.Tensor, gram: torch.Tensor, iters: int) -> torch.Tensor:
    """Up to `iters` swaps in every row, in place on keep (bool) and r; returns the swaps per row (int32)."""
    check_refine_args(keep, r, w, gram, iters)
    swaps = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    act = _Active(keep, r, w, gram)
    for _ in range(iters):
        if act.rows.numel() == 0:
            break
        a, b = _scores(act.w, act.r, act.w2g, act.keep)
        amin, p = a.min(1)
        wp, gp = act.w.gather(1, p[:, None]), gram[p]
        c = b - ((wp * 2) * act.w) * gp
        cmin, q = c.min(1)
        ok = (amin + cmin) < 0
        act.retire(ok)
        act.swap(gram, p[ok], q[ok], wp[ok], gp[ok])
        swaps[act.rows] += 1
    act.finish()
    return swaps


def group_grams(gram: torch.Tensor, m: int) -> torch.Tensor:
    """The (in/m, m, m) diagonal blocks of gram: G among the entries of each group of m."""
    groups = gram.shape[0] // m
    return gram.reshape(groups, m, groups, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def refine_nm_(keep: torch.Tensor, r: torch.Tensor, w: torch.Tensor, gram: torch.Tensor, m: int,
               iters: int) -> torch.Tensor:
    """Up to `iters` swaps inside the groups of m of every row, in place; returns the swaps per row (int32)."""
    check_refine_args(keep, r, w, gram, iters)
    rows_n, cols = w.shape
    if not (isinstance(m, int) and 1 < m <= 16 and cols % m == 0):
        raise ValueError(f"m must be in 2..16 and divide in_features {cols}, got {m!r}")
    blocks = group_grams(gram, m)
    swaps = torch.zeros(rows_n, dtype=torch.int32, device=w.device)
    act = _Active(keep, r, w, gram)
    for _ in range(iters):
        if act.rows.numel() == 0:
            break
        w3 = act.w.view(-1, cols // m, m)
        a, b = _scores(act.w, act.r, act.w2g, act.keep)
        pair = ((w3 * 2)[..., :, None] * w3[..., None, :]) * blocks
        total = a.view_as(w3)[..., :, None] + (b.view_as(w3)[..., None, :] - pair)
        best, flat = total.reshape(act.rows.numel(), -1).min(1)
        ok = best < 0
        act.retire(ok)
        group, pq = flat[ok] // (m * m), flat[ok] % (m * m)
        p, q = group * m + pq // m, group * m + pq % m
        act.swap(gram, p, q, act.w.gather(1, p[:, None]), gram[p])
        swaps[act.rows] += 1
    act.finish()
    return swaps


def transfer_(keep: torch.Tensor, r: torch.Tensor, w: torch.Tensor, gram: torch.Tensor) -> int:
    """One round of kept slots moved between rows (a matrix budget: the total stays), in place; returns
    the moves. Shared by every backend (torch code). Each row's best un-prune gain a* and best prune cost
    b*; a row receives if it ranks higher by a* than by b* (ties by row index), else donates; the k-th
    receiver (by a*) pairs with the k-th donor (by b*) while a* + b* < 0 (rows are independent, so that
    sum is the move's change of the error), then r is updated row by row as a swap's."""
    n = w.shape[0]
    a, b = _scores(w, r, (w * w) * gram.diagonal(), keep)
    amin, p = a.min(1)
    bmin, q = b.min(1)
    rank_a = torch.empty(n, dtype=torch.long, device=w.device)
    rank_a[amin.argsort(stable=True)] = torch.arange(n, device=w.device)
    rank_b = torch.empty_like(rank_a)
    rank_b[bmin.argsort(stable=True)] = torch.arange(n, device=w.device)
    recv, donor = (rank_a < rank_b).nonzero()[:, 0], (rank_a >= rank_b).nonzero()[:, 0]
    recv, donor = recv[amin[recv].argsort(stable=True)], donor[bmin[donor].argsort(stable=True)]
    k = min(recv.numel(), donor.numel())
    ok = (amin[recv[:k]] + bmin[donor[:k]]) < 0
    recv, donor = recv[:k][ok], donor[:k][ok]
    p, q = p[recv], q[donor]
    keep[recv, p] = True
    keep[donor, q] = False
    r[recv] = r[recv] - w[recv, p][:, None] * gram[p]
    r[donor] = r[donor] + w[donor, q][:, None] * gram[q]
    return int(recv.numel())

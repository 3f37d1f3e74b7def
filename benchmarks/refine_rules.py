"""The swap rules compared by refine_smollm2.py (research versions: torch, vectorised over rows, float32).

One row of W (w), its keep mask and the Gram matrix G of the layer's inputs; d = w on the pruned entries.
The row's output error is E = d G d^T (for the `target` objective see residual()); with the residual
r = d G, un-pruning a pruned p changes E by a_p = w_p^2 G_pp - 2 w_p r_p, pruning a kept q by
b_q = w_q^2 G_qq + 2 w_q r_q, and swapping both by a_p + b_q - 2 w_p w_q G_pq (the pair's cross term);
a swap updates r by - w_p G_p + w_q G_q. Every rule applies at most one swap per row per iteration, and
only when its exact gain (cross term included) is negative: the error never rises.

Pair selection (per row, per iteration):
- indep:   p = argmin a, q = argmin b (the cross term only checked): O(in);
- partner: p = argmin a, then q = argmin over kept of b_q - 2 w_p w_q G_pq (the best partner of p): O(in);
- both:    partner, and symmetrically the best partner of q = argmin b; the better of the two: O(in);
- topk:    the k best p by a and the k best q by b, all k^2 pairs exactly: O(in + k^2);
- exact:   every (pruned, kept) pair (SparseSwaps' optimal 1-swap): O(in^2).
"""

from __future__ import annotations

import torch

INF = float("inf")
RULES = ("indep", "partner", "both", "topk", "exact")


def residual(w, keep, G, cross=None):
    """r = d G (cross None); for the objective ||w X - k X'||^2 (k = w on the kept entries, G = X'^T X',
    cross = X^T X'), r = w cross - k G, the same gains with G = X'^T X'."""
    if cross is None:
        return torch.where(keep, 0.0, w) @ G
    return w @ cross - torch.where(keep, w, 0.0) @ G


def scores(w, r, w2g, keep):
    wr = w * r
    return (w2g - 2 * wr).masked_fill(keep, INF), (w2g + 2 * wr).masked_fill(~keep, INF)


def _pick(v, i):
    return v.gather(1, i[:, None])[:, 0]


def _partner(a, b, wa, Gi):
    """Best partner (argmin over b's support of b - 2 w_i w G_i) of the entry i of each row: (index, gain)."""
    c = b - 2 * wa * Gi
    j = c.argmin(1)
    return j, _pick(c, j)


def choose(rule, wa, a, b, G, k=8):
    """(p, q, gain) of every row under a rule."""
    if rule == "indep":
        p, q = a.argmin(1), b.argmin(1)
        return p, q, _pick(a, p) + _pick(b, q) - 2 * _pick(wa, p) * _pick(wa, q) * G[p, q]
    if rule in ("partner", "both"):
        p = a.argmin(1)
        q, c = _partner(a, b, wa * _pick(wa, p)[:, None], G[p])
        gain = _pick(a, p) + c
        if rule == "both":
            q2 = b.argmin(1)
            p2, c2 = _partner(b, a, wa * _pick(wa, q2)[:, None], G[q2])
            gain2 = _pick(b, q2) + c2
            second = gain2 < gain
            p, q, gain = torch.where(second, p2, p), torch.where(second, q2, q), torch.minimum(gain, gain2)
        return p, q, gain
    if rule == "topk":
        ap, pi = a.topk(k, dim=1, largest=False)
        bq, qi = b.topk(k, dim=1, largest=False)
        tot = ap[:, :, None] + bq[:, None, :] - 2 * (wa.gather(1, pi)[:, :, None] * wa.gather(1, qi)[:, None, :]) \
            * G[pi[:, :, None], qi[:, None, :]]
        j = tot.reshape(len(wa), -1).argmin(1)
        return _pick(pi, j // k), _pick(qi, j % k), tot.reshape(len(wa), -1).gather(1, j[:, None])[:, 0]
    if rule == "exact":
        cols = wa.shape[1]
        p, q, gain = [], [], []
        for s in range(0, len(wa), 8):
            tot = a[s:s + 8, :, None] + b[s:s + 8, None, :] - 2 * (wa[s:s + 8, :, None] * wa[s:s + 8, None, :]) * G
            flat = tot.reshape(tot.shape[0], -1)
            j = flat.argmin(1)
            p.append(j // cols), q.append(j % cols), gain.append(_pick(flat, j))
        return torch.cat(p), torch.cat(q), torch.cat(gain)
    raise ValueError(rule)


def apply_swaps(w, r, G, keep, rows, p, q):
    keep[rows, p] = True
    keep[rows, q] = False
    r[rows] += -w[rows, p][:, None] * G[p] + w[rows, q][:, None] * G[q]


def row_step(w, r, G, keep, w2g, rows, rule, k=8):
    """One iteration of per-row swaps on `rows`; returns the rows that swapped."""
    a, b = scores(w[rows], r[rows], w2g[rows], keep[rows])
    p, q, gain = choose(rule, w[rows], a, b, G, k)
    ok = gain < 0
    apply_swaps(w, r, G, keep, rows[ok], p[ok], q[ok])
    return rows[ok]


def refine_rows(w, G, keep, iters, rule="partner", cross=None, k=8):
    """Swaps inside every row (each row keeps its count); (keep, swaps)."""
    w, keep = w.float(), keep.clone()
    r = residual(w, keep, G, cross)
    w2g = w * w * G.diagonal()
    rows, swaps = torch.arange(w.shape[0]), 0
    for _ in range(iters):
        rows = row_step(w, r, G, keep, w2g, rows, rule, k)
        swaps += rows.numel()
        if rows.numel() == 0:
            break
    return keep, swaps


def nm_step(w, r, Gb, keep, w2g, rows, m, G):
    """One iteration of swaps inside groups of m: each row its best swap over its groups (exact)."""
    g = w.shape[1] // m
    a, b = scores(w[rows], r[rows], w2g[rows], keep[rows])
    w3 = w[rows].view(-1, g, m)
    pair = w3[..., :, None] * w3[..., None, :]
    tot = a.view(-1, g, m)[..., :, None] + b.view(-1, g, m)[..., None, :] - 2 * pair * Gb
    flat = tot.reshape(len(rows), -1)
    j = flat.argmin(1)
    ok = _pick(flat, j) < 0
    grp, pq = j // (m * m), j % (m * m)
    apply_swaps(w, r, G, keep, rows[ok], (grp * m + pq // m)[ok], (grp * m + pq % m)[ok])
    return rows[ok]


def refine_nm(w, G, keep, m, iters, cross=None):
    """Swaps inside every group of m consecutive entries of a row (each group keeps its count)."""
    w, keep = w.float(), keep.clone()
    g = w.shape[1] // m
    Gb = torch.stack([G[i * m:(i + 1) * m, i * m:(i + 1) * m] for i in range(g)])
    r = residual(w, keep, G, cross)
    w2g = w * w * G.diagonal()
    rows, swaps = torch.arange(w.shape[0]), 0
    for _ in range(iters):
        rows = nm_step(w, r, Gb, keep, w2g, rows, m, G)
        swaps += rows.numel()
        if rows.numel() == 0:
            break
    return keep, swaps


def transfer_step(w, r, G, keep, w2g):
    """Kept slots moved between rows (the matrix keeps its count): rows ranked by their best un-prune gain
    (receivers) and best prune cost (donors), each row in the role where it ranks higher, the k-th receiver
    paired with the k-th donor while the sum is negative. Returns the number of moves."""
    a, b = scores(w, r, w2g, keep)
    amin, p = a.min(1)
    bmin, q = b.min(1)
    n = w.shape[0]
    ra = torch.empty(n, dtype=torch.long)
    ra[amin.argsort(stable=True)] = torch.arange(n)
    rb = torch.empty(n, dtype=torch.long)
    rb[bmin.argsort(stable=True)] = torch.arange(n)
    recv, don = (ra < rb).nonzero()[:, 0], (ra >= rb).nonzero()[:, 0]
    recv, don = recv[amin[recv].argsort(stable=True)], don[bmin[don].argsort(stable=True)]
    k = min(len(recv), len(don))
    recv, don = recv[:k], don[:k]
    ok = (amin[recv] + bmin[don]) < 0
    recv, don = recv[ok], don[ok]
    keep[recv, p[recv]] = True
    r[recv] -= w[recv, p[recv]][:, None] * G[p[recv]]
    keep[don, q[don]] = False
    r[don] += w[don, q[don]][:, None] * G[q[don]]
    return int(ok.sum())


def refine_layer(w, G, keep, iters, rule="partner", cross=None, transfers=True, k=8):
    """Matrix budget: per-row swaps and (transfers) kept slots moved between rows; (keep, swaps, moves)."""
    w, keep = w.float(), keep.clone()
    r = residual(w, keep, G, cross)
    w2g = w * w * G.diagonal()
    everyone = torch.arange(w.shape[0])
    swaps = moves = 0
    for _ in range(iters):
        s = row_step(w, r, G, keep, w2g, everyone, rule, k).numel()
        mv = transfer_step(w, r, G, keep, w2g) if transfers else 0
        swaps, moves = swaps + s, moves + mv
        if s == 0 and mv == 0:
            break
    return keep, swaps, moves


def error(w, keep, G, cross=None, dense_gram=None) -> float:
    """The objective in float64: sum over rows of d G d^T, or ||w X - k X'||^2 with cross and dense_gram."""
    w = w.double()
    if cross is None:
        d = torch.where(keep, 0.0, w)
        return float(((d @ G.double()) * d).sum())
    k = torch.where(keep, w, 0.0)
    return float(((w @ dense_gram.double()) * w).sum() - 2 * ((w @ cross.double()) * k).sum()
                  + ((k @ G.double()) * k).sum())

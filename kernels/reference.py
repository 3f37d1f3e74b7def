"""The oracle: the torch twin of every kernel, the statement the tests hold the Triton kernels to.

Pure compute: tensors in, tensors out (or updated in place, trailing underscore). No nn.Module, no
transformers, no autograd. Each Triton launcher keeps its twin's signature; where no kernel can run, the
torch backend (torch_backend.py) runs these twins. What the launchers and the twins both run (keyed
subsets, the float64 finish of the step vectors, the selection hint, the OBS factor, the selections done
in torch on every backend) is in shared.py: no Triton file imports this module
(tests/test_architecture.py), so a kernel test never compares the oracle with itself.

Adding a kernel: its twin goes here, the pieces its launcher needs from torch go to shared.py, and both
backend modules (torch_backend.py, triton_backend.py) export it under the same name.

Maths (docs/method.md), for one prunable matrix W (out, in) and one calibration step:
    n_j        = E_tokens[x_j^2]                        activation statistics of the step
    S_ij       = |W_ij| * g_j                            magnitude (g = 1/mean), wanda (g = sqrt(n)/mean)
    S_ij       = (|W_ij| * (ir_i + ic_j)) * g_j          ria / stochria (ir = 1/row sum, ic = 1/col sum,
                                                         g = n^p / mean)
    z         <- z + kappa * (S - max(z - t, 0))         mirror step, Gamma = max(z - t, 0) implicit
    t         <- m-th smallest z, m = max(1, floor(lam * numel))
(the metrics' exponents and normalisers: metric_registry.py; `metric_score` writes S out in float64).

Arithmetic contract, so that every backend agrees bit for bit: the small vectors (ir, ic, g) are
computed once per step in float64 by `shared.finish_step_vectors` (every backend calls it) and cast to
float32; the elementwise update uses only correctly rounded float32 operations in the order written in
`mirror_update_` (no fused multiply-add: each product is rounded before it is added).

Masks rank entries by a total order: z descending, then |W| descending, then flat index ascending
(`rank_keys` packs the first two into one int64; ties on it go to the lower index).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .metric_registry import SUM_FLOOR, metric_spec, stochria_tau
from .shared import (
    StepVectors,
    channel_factor,
    finish_step_vectors,
    prune_block,
    stochastic_subset_sums,
    threshold_hint,
)


# --------------------------------------------------------------------------------------------------
# Activation statistics and the per-step small vectors
# --------------------------------------------------------------------------------------------------
def act_sqsum_(sqsum: torch.Tensor, x: torch.Tensor) -> int:
    """sqsum (in,) float64 += sum over tokens of x^2; x: (..., in). Returns the number of tokens.

    float64 accumulation: x^2 of an fp16/bf16/fp32 value is exact in float64, so the sum carries
    almost no rounding and backends that add in another order still agree after the cast to float32.
    """
    x2 = x.reshape(-1, x.shape[-1])
    sqsum += x2.to(torch.float64).square().sum(dim=0)
    return x2.shape[0]


def step_sums(
    weight: torch.Tensor, factor: torch.Tensor, name: str, base_key: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The reductions of one step over W, float64: (col_abs (in,), row_sum (out,), col_sum (in,),
    weighted_rows (out,)). col_abs = sum_i |W_ij|; row_sum/col_sum are the ria normalisers (full sums,
    or stochria's keyed subsets); weighted_rows = |W| @ factor. The last three are None for a metric
    without normaliser. Twin of the reduction kernel (kernels/metrics.py)."""
    rows, cols = weight.shape
    spec = metric_spec(name)
    wabs = weight.abs()
    col_abs = wabs.sum(dim=0, dtype=torch.float64)
    if not spec.row_sums:
        return col_abs, None, None, None
    if spec.normaliser == "full":
        row_sum, col_sum = wabs.sum(dim=1, dtype=torch.float64), col_abs
    else:
        row_sum, col_sum = stochastic_subset_sums(wabs, base_key, stochria_tau(rows, cols))
    weighted_rows = wabs.to(torch.float64) @ factor
    return col_abs, row_sum, col_sum, weighted_rows


def step_vectors(
    weight: torch.Tensor,
    act_sqsum: torch.Tensor | None,
    tokens: int,
    metric: str,
    base_key: int = 0,
) -> StepVectors:
    """The small vectors of one step for one matrix, computed in float64 and returned in float32.

    weight: (out, in); act_sqsum: (in,) sum of x^2 over the step's `tokens` tokens (unused by
    magnitude). Returns (row_inv (out,) | None, col_inv (in,) | None, col_scale (in,)) such that
    S = |W| * col_scale (magnitude, wanda) or S = (|W| * (row_inv + col_inv)) * col_scale (ria,
    stochria), normalised to mean 1 (mean taken in float64 from the same vectors).
    """
    rows, cols = weight.shape
    factor = channel_factor(act_sqsum, tokens, metric, cols, weight.device)
    sums = step_sums(weight, factor, metric, base_key)
    return finish_step_vectors(rows, cols, factor, *sums)


def metric_score(name: str, weight: torch.Tensor, act_sqmean: torch.Tensor | None,
                 row_sum: torch.Tensor | None = None, col_sum: torch.Tensor | None = None) -> torch.Tensor:
    """S (out, in) float64, normalised to mean 1: the registry's formula written out for reading, with no
    factoring into step vectors (tests hold the kernels' S to it). act_sqmean: n_j (in,); row_sum/col_sum:
    the normalisers of a "subsets" metric (`shared.stochastic_subset_sums`), else the full sums."""
    spec = metric_spec(name)
    a = weight.abs().to(torch.float64)
    factor = torch.ones(a.shape[1], dtype=torch.float64, device=a.device) if not spec.needs_activations else \
        act_sqmean.to(torch.float64).pow(spec.channel_exponent)
    if not spec.row_sums:
        score = a * factor
    else:
        rows = (a.sum(dim=1) if row_sum is None else row_sum).clamp_min(SUM_FLOOR)
        cols = (a.sum(dim=0) if col_sum is None else col_sum).clamp_min(SUM_FLOOR)
        score = (a / cols[None, :] + a / rows[:, None]) * factor
    return score / score.mean()


# --------------------------------------------------------------------------------------------------
# The fused mirror step (elementwise)
# --------------------------------------------------------------------------------------------------
def local_score(
    weight: torch.Tensor,
    row_inv: torch.Tensor | None,
    col_inv: torch.Tensor | None,
    col_scale: torch.Tensor,
) -> torch.Tensor:
    """S (out, in) float32 from the step vectors, in the fixed float32 operation order."""
    a = weight.abs().to(torch.float32)
    if row_inv is None:
        return a * col_scale[None, :]
    inv = row_inv[:, None] + col_inv[None, :]  # one rounded add
    return (a * inv) * col_scale[None, :]


def mirror_update_(
    z: torch.Tensor,
    weight: torch.Tensor,
    row_inv: torch.Tensor | None,
    col_inv: torch.Tensor | None,
    col_scale: torch.Tensor,
    kappa: float,
    threshold: float,
) -> None:
    """z (out, in) float32 in place: z <- z + kappa * (S - max(z - threshold, 0)).

    Every operation is a separately rounded float32 op (z + (kappa * (S - gamma))): the Triton kernel
    is launched without fp fusion so that it rounds identically.
    """
    _update_(z, local_score(weight, row_inv, col_inv, col_scale), kappa, threshold)


def _update_(z: torch.Tensor, s: torch.Tensor, kappa: float, threshold: float) -> None:
    """z <- z + kappa * (s - max(z - threshold, 0)), each float32 operation rounded in this order; s is spent."""
    gamma = (z - torch.tensor(threshold, dtype=torch.float32, device=z.device)).clamp_min_(0.0)
    s.sub_(gamma).mul_(torch.tensor(kappa, dtype=torch.float32, device=z.device))
    z.add_(s)


def _next_threshold(z: torch.Tensor, m: int, threshold: float) -> tuple[float, int]:
    t = float(kth_smallest(z, m))
    return t, threshold_hint(t, threshold)


def mirror_step_(
    z: torch.Tensor,
    weight: torch.Tensor,
    row_inv: torch.Tensor | None,
    col_inv: torch.Tensor | None,
    col_scale: torch.Tensor,
    kappa: float,
    threshold: float,
    m: int,
    hint: int = -1,
) -> tuple[float, int]:
    """One mirror step: `mirror_update_`, then t' = the exact m-th smallest z.

    Returns (t', hint for the next step). `hint` (from the previous step, -1 for none) tells a fused
    kernel where to gather the candidates of t' during the update pass; the result never depends
    on it (`threshold_hint`)."""
    mirror_update_(z, weight, row_inv, col_inv, col_scale, kappa, threshold)
    return _next_threshold(z, m, threshold)


def candidate_step_(
    z: torch.Tensor,
    a: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    row_inv: torch.Tensor | None,
    col_inv: torch.Tensor | None,
    col_scale: torch.Tensor,
    kappa: float,
    threshold: float,
    m: int,
    hint: int = -1,
) -> tuple[float, int]:
    """The mirror step of the entries (rows[k], cols[k]) of a matrix (the closed form's candidates): z (K,)
    float32 in place, a = their |W| (K,) float32, S gathered from the step vectors in `local_score`'s order;
    then t' = the exact m-th smallest z. Returns (t', hint for the next step), as `mirror_step_`."""
    cs = col_scale[cols]
    _update_(z, a * cs if row_inv is None else (a * (row_inv[rows] + col_inv[cols])) * cs, kappa, threshold)
    return _next_threshold(z, m, threshold)


# --------------------------------------------------------------------------------------------------
# Exact selection and masks
# --------------------------------------------------------------------------------------------------
def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th smallest (1-based) entry of `values` (any shape), as a 0-d tensor."""
    flat = values.reshape(-1)
    if not 1 <= k <= flat.numel():
        raise ValueError(f"k must be in [1, {flat.numel()}], got {k}")
    return flat.kthvalue(k).values


def rank_keys(z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """int64 keys, same shape as z, ordering entries by (z, |W|): larger key = more salient.

    z's float32 bits are mapped to a signed int order-preserving transform (total on -0/+0), |W|'s
    float32 bits (non-negative) fill the low 31 bits.
    """
    zb = z.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    zkey = zb ^ ((zb >> 31) & 0x7FFFFFFF)
    wkey = weight.abs().to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    return zkey * (1 << 31) + wkey


def _keep_first(order: torch.Tensor, k: int, shape: tuple[int, ...], dim: int) -> torch.Tensor:
    keep = torch.zeros(shape, dtype=torch.bool, device=order.device)
    return keep.scatter_(dim, order.narrow(dim, 0, k), True)


def topk_mask(keys: torch.Tensor, k: int) -> torch.Tensor:
    """bool mask (same shape) keeping the k largest keys of the whole tensor, ties to lower index: a stable
    descending sort keeps equal keys in index order."""
    flat = keys.reshape(-1)
    k = min(max(k, 0), flat.numel())
    return _keep_first(flat.sort(descending=True, stable=True).indices, k, flat.shape, 0).reshape(keys.shape)


def row_topk_mask(keys: torch.Tensor, k: int) -> torch.Tensor:
    """keys: (out, in). Keep the k largest of every row, ties to lower column index (a stable sort per row)."""
    k = min(max(k, 0), keys.shape[1])
    return _keep_first(keys.sort(dim=1, descending=True, stable=True).indices, k, keys.shape, 1)


def nm_mask(keys: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """keys: (out, in), in % m == 0. Keep the n largest of every m consecutive entries of a row."""
    rows, cols = keys.shape
    if not 0 < n < m or cols % m:
        raise ValueError(f"need 0 < n < m and in_features % m == 0, got n={n}, m={m}, in={cols}")
    groups = keys.reshape(rows, cols // m, m)
    # a stable descending sort leaves equal keys in index order: ties go to the lower index
    order = groups.sort(dim=-1, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order, True)
    return keep.reshape(rows, cols)


def global_keep_counts(
    keys: Sequence[torch.Tensor], total_keep: int, lower: list[int], upper: list[int]
) -> list[int]:
    """Per-matrix kept counts for one global cut with per-matrix bounds, by walking the total order (key
    desc, matrix order, index asc) entry by entry: after the first p entries matrix i keeps
    clamp(its entries among them, lower[i], upper[i]); the answer is the first p where the kept total
    reaches `total_keep` (it grows by 0 or 1 per entry). Memory (entries x matrices): for tests."""
    lo = torch.tensor(lower, dtype=torch.int64)
    hi = torch.tensor(upper, dtype=torch.int64)
    if bool((lo > hi).any()) or not int(lo.sum()) <= total_keep <= int(hi.sum()):
        raise ValueError(
            f"infeasible bounds: the kept total {total_keep} must lie in [{int(lo.sum())}, {int(hi.sum())}]"
        )
    flat = torch.cat([k.reshape(-1).cpu() for k in keys])
    owner = torch.cat([torch.full((k.numel(),), i, dtype=torch.int64) for i, k in enumerate(keys)])
    order = flat.sort(descending=True, stable=True).indices  # ties stay in (matrix, index) order
    above = torch.nn.functional.one_hot(owner[order], len(keys)).cumsum(0)
    above = torch.cat([torch.zeros(1, len(keys), dtype=torch.int64), above])
    kept = torch.minimum(torch.maximum(above, lo), hi)
    first = int((kept.sum(dim=1) == total_keep).nonzero()[0])
    return [int(v) for v in kept[first]]


# ------------------------------------------------------- OBS reconstruction (docs/method.md)
def hessian_accumulate_(h: torch.Tensor, x: torch.Tensor) -> None:
    """h (in, in) float32 += x^T x over the tokens of x (..., in), accumulated in float32."""
    xf = x.reshape(-1, x.shape[-1]).to(torch.float32)
    h.addmm_(xf.T, xf)


def obs_sweep_(
    w: torch.Tensor,
    u: torch.Tensor,
    keep: torch.Tensor | None = None,
    prune_count: int | None = None,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """The lazy-batch OBS sweep of SparseGPT, in place on w (rows, cols) float32; returns the keep mask.

    For each block of columns and each column i in it: q = the column with its pruned entries zeroed,
    err = (w - q) / U[i, i], the block's later columns -= err * U[i, i:]; after the block, the later
    columns -= Err @ U[block, later]. Vectorised over rows. The mask is `keep` when given; otherwise
    SparseGPT's rule on the current (updated) weights, score w^2 / U[i, i]^2: with `nm` = (n, m), the
    m - n smallest of every group of m columns of a row when the sweep reaches the group; else
    `prune_count` entries in all, the smallest of each block, spread over blocks in proportion to
    their columns. `prior` (rows, cols), when given, multiplies that score (a guide such as the
    saliency's rank: docs/method.md, "Reconstruction"). Pruned entries end as +0.0.
    """
    rows, cols = w.shape
    choose = keep is None
    keep = torch.ones_like(w, dtype=torch.bool) if choose else keep.clone()
    if choose and nm is not None and (not 0 < nm[0] < nm[1] or cols % nm[1]):
        raise ValueError(f"need 0 < n < m and in_features % m == 0, got n={nm[0]}, m={nm[1]}, in={cols}")
    if nm is not None:
        blocksize = max(nm[1], blocksize // nm[1] * nm[1])  # a group never straddles two blocks
    d = u.diagonal()
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, u1, k1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2], keep[:, i1:i2]
        err1 = torch.zeros_like(w1)
        if choose and nm is None:  # the block's share of the count, from the weights as the sweep reaches it
            prune_block(w, keep, d, prune_count, prior, (i1, i2))
        for i in range(i2 - i1):
            if choose and nm is not None and i % nm[1] == 0:
                n, m = nm
                score = w1[:, i:i + m].square() / d[i1 + i:i1 + i + m].square()
                if prior is not None:
                    score = score * prior[:, i1 + i:i1 + i + m]
                k1[:, i:i + m].scatter_(1, score.sort(dim=1, stable=True).indices[:, : m - n], False)
            col = w1[:, i]
            q = torch.where(k1[:, i], col, 0.0)
            err = (col - q) / u1[i, i]
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    w.masked_fill_(~keep, 0.0)
    return keep

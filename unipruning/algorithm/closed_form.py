"""The saliency of a matrix with frozen weights in closed form (docs/method.md, "The closed form").

With feedback none W is fixed, so the local score of step k has rank structure,
S_k = |W| * (r_k 1^T + 1 c_k^T) * 1 g_k^T, from the per-step vectors r_k = row_inv, c_k = col_inv,
g_k = col_scale (magnitude and wanda: S_k = |W| * 1 g_k^T). An entry that never falls below the
threshold follows z_k = (1 - kappa) z_{k-1} + kappa S_k + kappa t_{k-1}, so after n informative steps

    z_n = |W| * (R^T G + 1 h^T) + c,   w_k = kappa (1 - kappa)^(n - k),
    R = [r_k] (n x out),  G = [w_k g_k] (n x in),  h = sum_k w_k c_k g_k,  c = sum_k w_k t_{k-1}:

one (out x n) @ (n x in) product per matrix instead of n passes over it. The entries that can fall below
the threshold (the lam fraction at the bottom) follow the other branch, z_k = z_{k-1} + kappa S_k, and
they also decide the thresholds t_k. They are handled exactly: a candidate set C (the entries with the
smallest closed-form value, CANDIDATES times the threshold's count, and at least CANDIDATE_FRACTION of
the matrix) runs the exact float32 recursion, and t_k is the m-th smallest z of C. Whenever the bottom
m entries of every step lie in C (they are the smallest scores, which the smallest closed-form values
select), C's z and every t_k are those of the exact recursion, bit for bit; every other entry differs
from it only by float rounding (its closed form is evaluated in float64 and rounded once). The candidates'
recursion is one `ops.candidate_step_` per step: on a GPU one Triton kernel that also gathers the next
threshold's neighbourhood, as the mirror step does (docs/gpu-cost-model.md says why).
"""

from __future__ import annotations

import math

import torch

from .. import ops

CANDIDATES = 8  # candidate entries per entry below the threshold
CANDIDATE_FRACTION = 0.01  # and at least this fraction of the matrix
ROWS_PER_CHUNK = 1 << 22  # entries of the float64 closed form evaluated at a time


def step_vectors(weight: torch.Tensor, sqsums: list[torch.Tensor | None], tokens: list[int], metric: str,
                 keys: list[int]) -> ops.StepVectors:
    """The vectors of n steps at once, float32: (row_inv (n, out) | None, col_inv (n, in) | None,
    col_scale (n, in)), each row equal to that step's `ops.step_vectors` up to the order of float64 sums.
    The reductions over W that do not change with the step (column and ria row sums) run once, the
    weighted row sums of every step in one matrix product."""
    rows, cols = weight.shape
    spec = ops.metric_spec(metric)
    wabs = weight.abs()
    wabs64 = wabs.to(torch.float64)
    factors = torch.stack([ops.channel_factor(s, t, metric, cols, weight.device) for s, t in zip(sqsums, tokens,
                                                                                                 strict=True)])
    col_abs = wabs.sum(dim=0, dtype=torch.float64)
    weighted = wabs64 @ factors.T if spec.row_sums else None  # (out, n)
    row_abs = wabs.sum(dim=1, dtype=torch.float64) if spec.normaliser == "full" else None
    vectors = []
    for k, factor in enumerate(factors):
        if spec.normaliser == "full":
            sums = (row_abs, col_abs, weighted[:, k])
        elif spec.normaliser == "subsets":
            row_sum, col_sum = ops.stochastic_subset_sums(wabs, keys[k], ops.stochria_tau(rows, cols))
            sums = (row_sum, col_sum, weighted[:, k])
        else:
            sums = (None, None, None)
        vectors.append(ops.finish_step_vectors(rows, cols, factor, col_abs, *sums))
    row_inv = None if vectors[0][0] is None else torch.stack([v[0] for v in vectors])
    col_inv = None if vectors[0][1] is None else torch.stack([v[1] for v in vectors])
    return ops.StepVectors(row_inv, col_inv, torch.stack([v[2] for v in vectors]))


def _ema_weights(n: int, kappa: float, device: torch.device) -> torch.Tensor:
    """w_k = kappa (1 - kappa)^(n - k), k = 1..n, float64."""
    return kappa * (1 - kappa) ** torch.arange(n - 1, -1, -1, dtype=torch.float64, device=device)


def _closed_form(weight: torch.Tensor, row_inv, col_inv, col_scale: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """|W| * (R^T G + 1 h^T) in float64, (out, in); the threshold term c is added by the caller."""
    g = col_scale.to(torch.float64) * w[:, None]  # (n, in)
    if row_inv is None:
        return weight.abs().to(torch.float64) * g.sum(dim=0)[None, :]
    h = (col_inv.to(torch.float64) * g).sum(dim=0)
    r = row_inv.to(torch.float64).T  # (out, n)
    out = torch.empty(weight.shape, dtype=torch.float64, device=weight.device)
    step = max(1, ROWS_PER_CHUNK // max(1, weight.shape[1]))
    for lo in range(0, weight.shape[0], step):
        hi = min(lo + step, weight.shape[0])
        out[lo:hi] = weight[lo:hi].abs().to(torch.float64) * (r[lo:hi] @ g + h[None, :])
    return out


def _exact_candidates(weight: torch.Tensor, flat: torch.Tensor, vectors: ops.StepVectors, kappa: float, m: int,
                      backend: str | None) -> tuple[torch.Tensor, list[float]]:
    """The exact float32 recursion on the candidate entries `flat` (flat indices), one `ops.candidate_step_`
    per step: their final z and the thresholds t_1..t_n."""
    cols = weight.shape[1]
    candidates = ops.Candidates(torch.zeros(flat.numel(), dtype=torch.float32, device=weight.device),
                                weight.reshape(-1)[flat].abs().to(torch.float32), (flat // cols).to(torch.int32),
                                (flat % cols).to(torch.int32))
    previous, thresholds = (0.0, -1), []
    for k in range(vectors.col_scale.shape[0]):
        step = ops.StepVectors(*(None if v is None else v[k] for v in vectors))
        previous = ops.candidate_step_(candidates, step, kappa, m, previous, backend)
        thresholds.append(previous[0])
    return candidates.z, thresholds


def saliency(weight: torch.Tensor, vectors: ops.StepVectors, kappa: float, lam_count: int,
             backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(z (out, in) float32, t 0-d float32) after the steps whose `vectors` are given (n rows each), with
    m = lam_count entries below the threshold; see the module docstring."""
    n, numel = vectors.col_scale.shape[0], weight.numel()
    w = _ema_weights(n, kappa, weight.device)
    ema = _closed_form(weight, *vectors, w)
    count = min(numel, max(CANDIDATES * lam_count, math.ceil(CANDIDATE_FRACTION * numel), lam_count))
    flat = ema.reshape(-1).topk(count, largest=False, sorted=False).indices
    z_exact, thresholds = _exact_candidates(weight, flat, vectors, kappa, lam_count, backend)
    previous = torch.tensor([0.0, *thresholds[:-1]], dtype=torch.float64, device=weight.device)
    z = (ema + (w * previous).sum()).to(torch.float32)
    z.view(-1)[flat] = z_exact
    return z, torch.tensor(thresholds[-1], dtype=torch.float32)

"""The step's reduction pass: every sum the local metric needs, in one read of W.

For W (out, in) and the channel factor f (in,) float64, one pass produces (float64)
    col_abs[j]       = sum_i |W_ij|
    row_sum[i]       = sum_j |W_ij|                       ria
                     = sum_j |W_ij| [(pos_c[j] - off_r[i]) mod in  < tau]   stochria: row i's subset
    col_sum[j]       = col_abs[j]                          ria
                     = sum_i |W_ij| [(pos_r[i] - off_c[j]) mod out < tau]   stochria: column j's subset
    weighted_rows[i] = sum_j |W_ij| f_j                    (ria, stochria: the mean of S)
The stochria subsets are the cyclic windows of `shared.subset_vectors` (four int32 vectors the
launcher computes with that shared torch code): the kernel loads them with the tiles and tests
membership with one int32 subtraction, fold and compare per entry, so the pass reads W once and
hashes nothing; `shared.stochastic_subset_sums` (in the twin) gathers the same members from the same vectors.
Each program covers a column block and a run of row tiles and writes partial sums; the partials
are added in a fixed order by torch and finished by `shared.finish_step_vectors`, so the
vectors match the twin (sums of the same terms in float64, rounded to float32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grid import row_tiled
from .metric_registry import metric_spec, stochria_tau
from .shared import channel_factor, finish_step_vectors, subset_vectors


@triton.jit(do_not_specialize=["tau", "row_tiles_per_program"])  # per shape: one compile per dtype
def _step_sums_kernel(
    col_abs_ptr,
    col_sum_ptr,
    row_sum_ptr,
    wrow_ptr,
    w_ptr,
    factor_ptr,
    pos_r_ptr,
    off_r_ptr,
    pos_c_ptr,
    off_c_ptr,
    rows,
    cols,
    stride_w,
    tau,
    row_tiles_per_program,
    ROW_SUMS: tl.constexpr,
    STOCH: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    col = pid_c.to(tl.int32) * BLOCK_C + tl.arange(0, BLOCK_C)  # int32: cols < 2^31; row offsets are int64
    col_ok = col < cols
    col_abs = tl.zeros((BLOCK_C,), dtype=tl.float64)
    col_sub = tl.zeros((BLOCK_C,), dtype=tl.float64)
    # the per-column vectors (factor, stochria's positions and offsets) are read again for every tile, from
    # L1, rather than held through the loop: fewer live registers, more programs resident
    for i in range(0, row_tiles_per_program):
        row = (pid_r * row_tiles_per_program + i) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        row_ok = row < rows
        ok = row_ok[:, None] & col_ok[None, :]
        a = tl.abs(tl.load(w_ptr + row[:, None] * stride_w + col[None, :], mask=ok, other=0.0).to(tl.float32))
        a = a.to(tl.float64)
        col_abs += tl.sum(a, axis=0)
        if ROW_SUMS:
            out = pid_c * rows + row
            factor = tl.load(factor_ptr + col, mask=col_ok, other=0.0)
            tl.store(wrow_ptr + out, tl.sum(a * factor[None, :], axis=1), mask=row_ok)
            if STOCH:  # the columns' positions in the column order, their offsets in the row order
                pos_c = tl.load(pos_c_ptr + col, mask=col_ok, other=0)[None, :]
                off_c = tl.load(off_c_ptr + col, mask=col_ok, other=0)[None, :]
                pos_r = tl.load(pos_r_ptr + row, mask=row_ok, other=0)[:, None]
                off_r = tl.load(off_r_ptr + row, mask=row_ok, other=0)[:, None]
                # int32 cyclic distances in (-n, n), folded into [0, n): membership of the windows.
                # Masked lanes carry a = 0, so their (meaningless) membership adds nothing.
                d = pos_c - off_r
                in_row = tl.where(d < 0, d + cols, d) < tau
                e = pos_r - off_c
                in_col = tl.where(e < 0, e + rows, e) < tau
                tl.store(row_sum_ptr + out, tl.sum(tl.where(in_row, a, 0.0), axis=1), mask=row_ok)
                col_sub += tl.sum(tl.where(in_col, a, 0.0), axis=0)
            else:
                tl.store(row_sum_ptr + out, tl.sum(a, axis=1), mask=row_ok)
    tl.store(col_abs_ptr + pid_r * cols + col, col_abs, mask=col_ok)
    if STOCH:
        tl.store(col_sum_ptr + pid_r * cols + col, col_sub, mask=col_ok)


def step_sums_triton(weight: torch.Tensor, factor: torch.Tensor, name: str, base_key: int = 0):
    """`reference.step_sums` in one pass over W."""
    spec = metric_spec(name)
    rows, cols = weight.shape
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    row_sums, stoch = spec.row_sums, spec.normaliser == "subsets"
    dev = weight.device
    # stochria holds two membership tiles beside |W|: half the rows per tile keeps it at 25% occupancy on sm_90
    block_r, block_c, per_program, programs_r = row_tiled(rows, cols, 16 if stoch else 32, 64, 4096)
    col_blocks = triton.cdiv(cols, block_c)
    f64 = dict(dtype=torch.float64, device=dev)
    col_abs = torch.empty((programs_r, cols), **f64)
    col_sum = torch.empty((programs_r, cols), **f64) if stoch else col_abs
    row_sum = torch.empty((col_blocks, rows), **f64) if row_sums else col_abs
    wrow = torch.empty((col_blocks, rows), **f64) if row_sums else col_abs
    tau = stochria_tau(rows, cols)
    if stoch:
        subsets = subset_vectors(base_key, rows, cols, dev)
    else:
        subsets = (torch.zeros(1, dtype=torch.int32, device=dev),) * 4
    _step_sums_kernel[(col_blocks, programs_r)](
        col_abs, col_sum, row_sum, wrow, weight, factor.to(torch.float64).contiguous(), *subsets,
        rows, cols, weight.stride(0), tau, per_program,
        ROW_SUMS=row_sums, STOCH=stoch, BLOCK_R=block_r, BLOCK_C=block_c,
    )
    col_abs_total = col_abs.sum(dim=0)
    if not row_sums:
        return col_abs_total, None, None, None
    col_total = col_sum.sum(dim=0) if stoch else col_abs_total
    return col_abs_total, row_sum.sum(dim=0), col_total, wrow.sum(dim=0)


def step_vectors_triton(weight, act_sqsum, tokens, name, base_key=0):
    """`reference.step_vectors` with the reduction pass in Triton; factor and finish are shared."""
    rows, cols = weight.shape
    factor = channel_factor(act_sqsum, tokens, name, cols, weight.device)
    return finish_step_vectors(rows, cols, factor, *step_sums_triton(weight, factor, name, base_key))

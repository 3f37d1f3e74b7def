"""The step's reduction pass: every sum the local metric needs, in one read of W.

For W (out, in) and the channel factor f (in,) float64, one pass produces (float64)
    col_abs[j]       = sum_i |W_ij|
    row_sum[i]       = sum_j |W_ij|                       ria
                     = sum_j |W_ij| [pi_{key(i)}(j) < tau]  stochria: row i's keyed subset
    col_sum[j]       = col_abs[j]                          ria
                     = sum_i |W_ij| [pi_{key'(j)}(i) < tau] stochria: column j's keyed subset
    weighted_rows[i] = sum_j |W_ij| f_j                    (ria, stochria: the mean of S)
The stochria subsets are the keyed Feistel permutations of `reference.keyed_permutation`, evaluated
forward in registers for every entry (two per entry, cycle walking included), so the pass reads W
once; `reference.stochastic_subset_sums` gathers the same subsets through the inverse permutation.
Each program covers a column block and a run of row tiles and writes partial sums; the partials
are added in a fixed order by torch and finished by `reference.finish_step_vectors`, so the
vectors match the twin (sums of the same terms in float64, rounded to float32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference as R
from .grid import row_tiled


@triton.jit
def _mix32(x):
    """reference.mix32 on int64 lanes holding 32-bit values (products stay below 2^63)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    return x


@triton.jit
def _feistel(x, k0, k1, k2, k3, low_bits, low_mask, high_mask):
    """reference._feistel forward, four alternating rounds."""
    high = x >> low_bits
    low = x & low_mask
    high = high ^ (_mix32(low ^ k0) & high_mask)
    low = low ^ (_mix32(high ^ k1) & low_mask)
    high = high ^ (_mix32(low ^ k2) & high_mask)
    low = low ^ (_mix32(high ^ k3) & low_mask)
    return (high << low_bits) | low


@triton.jit
def _permute(x, k0, k1, k2, k3, n, bits):
    """pi_key(x) on [0, n) by cycle walking (reference.keyed_permutation)."""
    low_bits = bits // 2
    low_mask = (1 << low_bits) - 1
    high_mask = (1 << (bits - low_bits)) - 1
    y = _feistel(x, k0, k1, k2, k3, low_bits, low_mask, high_mask)
    while tl.max(tl.max((y >= n).to(tl.int32), axis=1), axis=0) > 0:
        y = tl.where(y >= n, _feistel(y, k0, k1, k2, k3, low_bits, low_mask, high_mask), y)
    return y


@triton.jit
def _step_sums_kernel(
    col_abs_ptr,
    col_sum_ptr,
    row_sum_ptr,
    wrow_ptr,
    w_ptr,
    factor_ptr,
    row_keys_ptr,
    col_keys_ptr,
    rows,
    cols,
    stride_w,
    tau,
    row_bits,
    col_bits,
    row_tiles_per_program,
    ROW_SUMS: tl.constexpr,
    STOCH: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    col = pid_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    col_ok = col < cols
    col_abs = tl.zeros((BLOCK_C,), dtype=tl.float64)
    col_sub = tl.zeros((BLOCK_C,), dtype=tl.float64)
    if ROW_SUMS:
        factor = tl.load(factor_ptr + col, mask=col_ok, other=0.0)
    if STOCH:  # column j's subset: its round keys, permuting row indices
        ck0 = tl.load(col_keys_ptr + col * 4 + 0, mask=col_ok, other=0)[None, :]
        ck1 = tl.load(col_keys_ptr + col * 4 + 1, mask=col_ok, other=0)[None, :]
        ck2 = tl.load(col_keys_ptr + col * 4 + 2, mask=col_ok, other=0)[None, :]
        ck3 = tl.load(col_keys_ptr + col * 4 + 3, mask=col_ok, other=0)[None, :]
    for i in range(0, row_tiles_per_program):
        row = (pid_r * row_tiles_per_program + i) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        row_ok = row < rows
        ok = row_ok[:, None] & col_ok[None, :]
        a = tl.abs(tl.load(w_ptr + row[:, None] * stride_w + col[None, :], mask=ok, other=0.0).to(tl.float32))
        a = a.to(tl.float64)
        col_abs += tl.sum(a, axis=0)
        if ROW_SUMS:
            out = pid_c * rows + row
            tl.store(wrow_ptr + out, tl.sum(a * factor[None, :], axis=1), mask=row_ok)
            if STOCH:
                rk0 = tl.load(row_keys_ptr + row * 4 + 0, mask=row_ok, other=0)[:, None]
                rk1 = tl.load(row_keys_ptr + row * 4 + 1, mask=row_ok, other=0)[:, None]
                rk2 = tl.load(row_keys_ptr + row * 4 + 2, mask=row_ok, other=0)[:, None]
                rk3 = tl.load(row_keys_ptr + row * 4 + 3, mask=row_ok, other=0)[:, None]
                jj = tl.where(ok, col[None, :] + row[:, None] * 0, 0)
                ii = tl.where(ok, row[:, None] + col[None, :] * 0, 0)
                in_row = _permute(jj, rk0, rk1, rk2, rk3, cols, col_bits) < tau
                in_col = _permute(ii, ck0, ck1, ck2, ck3, rows, row_bits) < tau
                tl.store(row_sum_ptr + out, tl.sum(tl.where(in_row, a, 0.0), axis=1), mask=row_ok)
                col_sub += tl.sum(tl.where(in_col, a, 0.0), axis=0)
            else:
                tl.store(row_sum_ptr + out, tl.sum(a, axis=1), mask=row_ok)
    tl.store(col_abs_ptr + pid_r * cols + col, col_abs, mask=col_ok)
    if STOCH:
        tl.store(col_sum_ptr + pid_r * cols + col, col_sub, mask=col_ok)


def step_sums_triton(weight: torch.Tensor, factor: torch.Tensor, metric: str, base_key: int = 0):
    """`reference.step_sums` in one pass over W."""
    if metric not in R.METRICS:
        raise ValueError(f"metric must be one of {', '.join(R.METRICS)}, got {metric!r}")
    rows, cols = weight.shape
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    row_sums, stoch = metric in ("ria", "stochria"), metric == "stochria"
    dev = weight.device
    block_r, block_c, per_program, programs_r = row_tiled(rows, cols, 32, 64, 4096)
    col_blocks = triton.cdiv(cols, block_c)
    f64 = dict(dtype=torch.float64, device=dev)
    col_abs = torch.empty((programs_r, cols), **f64)
    col_sum = torch.empty((programs_r, cols), **f64) if stoch else col_abs
    row_sum = torch.empty((col_blocks, rows), **f64) if row_sums else col_abs
    wrow = torch.empty((col_blocks, rows), **f64) if row_sums else col_abs
    tau = R.stochria_tau(rows, cols)
    if stoch:
        row_keys = torch.stack(R._round_keys(R.subset_keys(base_key, 0, rows, dev)), dim=1).contiguous()
        col_keys = torch.stack(R._round_keys(R.subset_keys(base_key, 1, cols, dev)), dim=1).contiguous()
    else:
        row_keys = col_keys = torch.zeros(4, dtype=torch.int64, device=dev)
    _step_sums_kernel[(col_blocks, programs_r)](
        col_abs, col_sum, row_sum, wrow, weight, factor.to(torch.float64).contiguous(), row_keys, col_keys,
        rows, cols, weight.stride(0), tau, R._domain_bits(rows), R._domain_bits(cols), per_program,
        ROW_SUMS=row_sums, STOCH=stoch, BLOCK_R=block_r, BLOCK_C=block_c,
    )
    col_abs_total = col_abs.sum(dim=0)
    if not row_sums:
        return col_abs_total, None, None, None
    col_total = col_sum.sum(dim=0) if stoch else col_abs_total
    return col_abs_total, row_sum.sum(dim=0), col_total, wrow.sum(dim=0)


def step_vectors_triton(weight, act_sqsum, tokens, metric, base_key=0):
    """`reference.step_vectors` with the reduction pass in Triton; factor and finish are shared."""
    rows, cols = weight.shape
    factor = R.channel_factor(act_sqsum, tokens, metric, cols, weight.device)
    return R.finish_step_vectors(rows, cols, factor, *step_sums_triton(weight, factor, metric, base_key))

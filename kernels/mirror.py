"""The fused mirror step: S elementwise, z <- z + kappa (S - max(z - t, 0)) in place, and the exact
next threshold t' = the m-th smallest z, without materialising S.

Shapes: z (out, in) float32 contiguous, updated in place; weight (out, in) float32/float16/bfloat16
(row stride free); row_inv (out,) or None (magnitude, wanda), col_inv (in,) or None, col_scale (in,)
float32 (the step vectors of `reference.step_vectors`).

Arithmetic: the same float32 operations in the same order as `reference.mirror_update_`, each
rounded (kernels launch with enable_fp_fusion=False: no fused multiply-add), so z is bit-identical
to the twin (under the interpreter and, IEEE float32 being what it is, on a GPU).

Selection of t' in the same pass: every program builds a histogram of the new z over 4096 bins of
its order-preserving 12-bit prefix (1/8 octave per bin) and adds it to a global histogram, and it
copies the entries whose bin lies in a window around the previous threshold's bin into a small
candidate buffer. The bin that holds the m-th smallest is read off the histogram; if it lies in the
window (the threshold moves by about kappa per step, so after the first step it does) the exact
value is the r-th smallest candidate of that bin, else a radix select over z (select.py) finds it.
Two passes per step (the step vectors' reduction and this one), plus a refine over one bin.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

HIST_BITS = 12
NUM_BINS = 1 << HIST_BITS


@triton.jit
def _ordered_bin(x, HIST_BITS: tl.constexpr):
    """The top HIST_BITS bits of x's order-preserving unsigned key (x float32)."""
    bits = x.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) | -2147483648)  # negative: all bits flipped; positive: sign bit set
    return (key >> (32 - HIST_BITS)) & ((1 << HIST_BITS) - 1)


@triton.jit
def _mirror_step_kernel(
    z_ptr,
    hist_ptr,
    cand_ptr,
    cand_count_ptr,
    w_ptr,
    row_inv_ptr,
    col_inv_ptr,
    col_scale_ptr,
    rows,
    cols,
    stride_w,
    kappa,
    threshold,
    lo_bin,
    hi_bin,
    cand_cap,
    row_tiles_per_program,
    HAS_ROW: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HIST_BITS: tl.constexpr,
):
    pid_c = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    col = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = col < cols
    col_scale = tl.load(col_scale_ptr + col, mask=col_ok, other=0.0)
    if HAS_ROW:
        col_inv = tl.load(col_inv_ptr + col, mask=col_ok, other=0.0)
    hist = tl.zeros((1 << HIST_BITS,), dtype=tl.int32)
    for i in range(0, row_tiles_per_program):
        row = (pid_r * row_tiles_per_program + i) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        row_ok = row < rows
        ok = row_ok[:, None] & col_ok[None, :]
        a = tl.abs(tl.load(w_ptr + row[:, None] * stride_w + col[None, :], mask=ok, other=0.0).to(tl.float32))
        if HAS_ROW:
            row_inv = tl.load(row_inv_ptr + row, mask=row_ok, other=0.0)
            inv = row_inv[:, None] + col_inv[None, :]
            s = (a * inv) * col_scale[None, :]
        else:
            s = a * col_scale[None, :]
        zp = z_ptr + row[:, None] * cols + col[None, :]
        z = tl.load(zp, mask=ok, other=0.0)
        gamma = tl.maximum(z - threshold, 0.0)  # float scalars arrive as float32
        z = z + (s - gamma) * kappa
        tl.store(zp, z, mask=ok)
        bins = _ordered_bin(z, HIST_BITS)
        hist += tl.histogram(tl.reshape(bins, (BLOCK_R * BLOCK_C,)), 1 << HIST_BITS,
                             mask=tl.reshape(ok, (BLOCK_R * BLOCK_C,)))
        take = ok & (bins >= lo_bin) & (bins <= hi_bin)
        flat_take = tl.reshape(take, (BLOCK_R * BLOCK_C,)).to(tl.int32)
        count = tl.sum(flat_take, axis=0)
        if count > 0:
            base = tl.atomic_add(cand_count_ptr, count)
            pos = base + tl.cumsum(flat_take, axis=0) - 1
            keep = (flat_take > 0) & (pos < cand_cap)
            tl.store(cand_ptr + pos, tl.reshape(z, (BLOCK_R * BLOCK_C,)), mask=keep)
    bins_all = tl.arange(0, 1 << HIST_BITS)
    tl.atomic_add(hist_ptr + bins_all, hist, mask=hist > 0)


def _launch_config(rows: int, cols: int) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_C, row tiles per program, row programs): deterministic, from the shape."""
    block_c = 128 if cols >= 128 else triton.next_power_of_2(max(cols, 16))
    block_r = 16
    col_blocks = triton.cdiv(cols, block_c)
    row_tiles = triton.cdiv(rows, block_r)
    # about 1024 programs: enough to fill a GPU, few histogram flushes
    programs_r = max(1, min(row_tiles, 1024 // col_blocks))
    per_program = triton.cdiv(row_tiles, programs_r)
    return block_r, block_c, per_program, triton.cdiv(row_tiles, per_program)


def _ordered_bins(values: torch.Tensor) -> torch.Tensor:
    """Torch version of the kernel's bin of each float32 value (for the refine on candidates)."""
    bits = values.view(torch.int32).to(torch.int64)
    key = torch.where(bits < 0, ~bits & 0xFFFFFFFF, bits | 0x80000000)
    return key >> (32 - HIST_BITS)


def _launch(z, weight, row_inv, col_inv, col_scale, kappa, threshold, hint):
    rows, cols = z.shape
    if z.dtype != torch.float32 or not z.is_contiguous():
        raise ValueError("z must be a contiguous float32 matrix")
    if weight.shape != z.shape or weight.stride(1) != 1:
        raise ValueError(f"weight must be {tuple(z.shape)} with unit column stride, got {tuple(weight.shape)}")
    has_row = row_inv is not None
    dev = z.device
    hist = torch.zeros(NUM_BINS, dtype=torch.int32, device=dev)
    cand = torch.empty(max(4096, z.numel() // 128) if hint >= 0 else 1, dtype=torch.float32, device=dev)
    cand_count = torch.zeros(1, dtype=torch.int32, device=dev)
    lo, hi = (hint - 1, hint + 1) if hint >= 0 else (NUM_BINS, -1)  # empty window without a hint
    block_r, block_c, per_program, programs_r = _launch_config(rows, cols)
    grid = (triton.cdiv(cols, block_c), programs_r)
    _mirror_step_kernel[grid](
        z, hist, cand, cand_count, weight,
        row_inv if has_row else col_scale, col_inv if has_row else col_scale, col_scale,
        rows, cols, weight.stride(0), float(kappa), float(threshold), lo, hi, cand.numel(), per_program,
        HAS_ROW=has_row, BLOCK_R=block_r, BLOCK_C=block_c, HIST_BITS=HIST_BITS, enable_fp_fusion=False,
    )
    return hist, cand, cand_count, (lo, hi)


def mirror_update_triton(z, weight, row_inv, col_inv, col_scale, kappa: float, threshold: float) -> None:
    """z <- z + kappa * (S - max(z - threshold, 0)) in place (`reference.mirror_update_`)."""
    _launch(z, weight, row_inv, col_inv, col_scale, kappa, threshold, -1)


def mirror_step_triton(
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
    """Update z in place and return (t', bin of t'): t' is the exact m-th smallest new z
    (`reference.mirror_step_`). `hint`: the bin returned by the previous step (-1: none)."""
    from .select import kth_smallest_triton

    if not 1 <= m <= z.numel():
        raise ValueError(f"m must be in [1, {z.numel()}], got {m}")
    hist, cand, cand_count, (lo, hi) = _launch(z, weight, row_inv, col_inv, col_scale, kappa, threshold, hint)
    cum = hist.to(torch.int64).cumsum(0)
    b = int(torch.searchsorted(cum, torch.tensor([m], device=z.device, dtype=torch.int64)).item())
    below = int(cum[b - 1]) if b > 0 else 0
    count = int(cand_count.item())
    if lo <= b <= hi and count <= cand.numel():
        values = cand[:count]
        in_bin = values[_ordered_bins(values) == b]
        return float(in_bin.kthvalue(m - below).values), b
    return float(kth_smallest_triton(z, m)), b

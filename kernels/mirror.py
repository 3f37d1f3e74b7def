"""The fused mirror step: S elementwise, z <- z + kappa (S - max(z - t, 0)) in place, and the exact
next threshold t' = the m-th smallest z, without materialising S.

Shapes: z (out, in) float32 contiguous, updated in place; weight (out, in) float32/float16/bfloat16
(row stride free); row_inv (out,) or None (magnitude, wanda), col_inv (in,) or None, col_scale (in,)
float32 (the step vectors of `reference.step_vectors`).

Arithmetic: the same float32 operations in the same order as `reference.mirror_update_`, each
rounded (kernels launch with enable_fp_fusion=False: no fused multiply-add), so z is bit-identical
to the twin (under the interpreter and, IEEE float32 being what it is, on a GPU).

Selection of t' in the same pass: the threshold moves smoothly (about linearly in z's early steps,
by about kappa per step later), so the previous steps predict it (`shared.threshold_hint`: a
window of keys around an extrapolation). The update pass counts the new z below the window and
copies the entries inside it to a small candidate buffer (per-tile compaction, one atomic per tile).
If the m-th smallest falls in the window, t' is read off the sorted candidates: two passes per step
(the step vectors' reduction and this one) plus a sort of a few thousand values. Otherwise (the
first step, or a jump) a sample-select over z finds it (select.py).

The candidate step (`candidate_step_triton`) is the same step on a gathered subset of a matrix's entries,
the closed form's candidates (algorithm/closed_form.py): z (K,), |W| (K,) and the entries' row and column
(int32), S gathered from the step vectors; the same window selection, one kernel per step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grid import row_tiled
from .select import kth_smallest_triton
from .shared import threshold_hint


@triton.jit
def _window(z, ok, lo_key, hi_key, cand_ptr, cand_count_ptr, cand_cap):
    """For a 1-D block of new z: the count of keys below the window (int64), and the values inside it
    appended to the candidate buffer (one atomic per block; per-block counts fit int32, half the registers of
    int64)."""
    bits = z.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed order-preserving key of a float32
    below = tl.sum((ok & (key < lo_key)).to(tl.int32), axis=0).to(tl.int64)
    take = (ok & (key >= lo_key) & (key <= hi_key)).to(tl.int32)
    count = tl.sum(take, axis=0)
    if count > 0:
        base = tl.atomic_add(cand_count_ptr, count.to(tl.int64))
        pos = base + (tl.cumsum(take, axis=0) - 1).to(tl.int64)
        tl.store(cand_ptr + pos, z, mask=(take > 0) & (pos < cand_cap))
    return below


# the window's keys and the buffer's size change every step: fixed types, never specialised on
# the window's keys and the buffer's size change every step: fixed types, never specialised on
@triton.jit(do_not_specialize=["lo_key", "hi_key", "cand_cap", "row_tiles_per_program"])
def _mirror_step_kernel(
    z_ptr,
    below_ptr,
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
    lo_key: tl.int32,
    hi_key: tl.int32,
    cand_cap: tl.int64,
    row_tiles_per_program,
    HAS_ROW: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    col = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = col < cols
    col_scale = tl.load(col_scale_ptr + col, mask=col_ok, other=0.0)
    if HAS_ROW:
        col_inv = tl.load(col_inv_ptr + col, mask=col_ok, other=0.0)
    below = tl.zeros((), dtype=tl.int64)
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
        below += _window(tl.reshape(z, (BLOCK_R * BLOCK_C,)), tl.reshape(ok, (BLOCK_R * BLOCK_C,)), lo_key, hi_key,
                         cand_ptr, cand_count_ptr, cand_cap)
    tl.atomic_add(below_ptr, below)


@triton.jit(do_not_specialize=["n", "lo_key", "hi_key", "cand_cap"])
def _candidate_step_kernel(
    z_ptr,
    below_ptr,
    cand_ptr,
    cand_count_ptr,
    a_ptr,
    rows_ptr,
    cols_ptr,
    row_inv_ptr,
    col_inv_ptr,
    col_scale_ptr,
    n: tl.int64,
    kappa,
    threshold,
    lo_key: tl.int32,
    hi_key: tl.int32,
    cand_cap: tl.int64,
    HAS_ROW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = offs < n
    a = tl.load(a_ptr + offs, mask=ok, other=0.0)
    col = tl.load(cols_ptr + offs, mask=ok, other=0)
    col_scale = tl.load(col_scale_ptr + col, mask=ok, other=0.0)
    if HAS_ROW:
        row = tl.load(rows_ptr + offs, mask=ok, other=0)
        inv = tl.load(row_inv_ptr + row, mask=ok, other=0.0) + tl.load(col_inv_ptr + col, mask=ok, other=0.0)
        s = (a * inv) * col_scale
    else:
        s = a * col_scale
    z = tl.load(z_ptr + offs, mask=ok, other=0.0)
    z = z + (s - tl.maximum(z - threshold, 0.0)) * kappa
    tl.store(z_ptr + offs, z, mask=ok)
    tl.atomic_add(below_ptr, _window(z, ok, lo_key, hi_key, cand_ptr, cand_count_ptr, cand_cap))


def _window_buffers(hint: int, numel: int, device) -> tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lo, hi, below counter, candidate buffer, candidate count) for the window `hint` predicts."""
    if hint >= 0:  # center << 32 | half width, from shared.threshold_hint
        center, half = hint >> 32, hint & 0xFFFFFFFF
        lo, hi = max(center - half, -(1 << 31)), min(center + half, (1 << 31) - 1)
    else:  # no prediction: an empty window
        lo, hi = (1 << 31) - 1, -(1 << 31)
    below = torch.zeros(1, dtype=torch.int64, device=device)
    cand_count = torch.zeros(1, dtype=torch.int64, device=device)
    cand = torch.empty(max(4096, numel // 256) if hint >= 0 else 1, dtype=torch.float32, device=device)
    return lo, hi, below, cand, cand_count


def _threshold(z: torch.Tensor, m: int, hint: int, threshold: float, buffers) -> tuple[float, int]:
    """The exact m-th smallest z from the window's counts and candidates, or by sample-select when the
    window missed it; and the hint for the next step."""
    below, count = (int(v) for v in torch.cat([buffers[2], buffers[4]]).tolist())  # the one host read
    cand = buffers[3]
    if hint >= 0 and count <= cand.numel() and below < m <= below + count:
        t = float(cand[:count].sort().values[m - below - 1])
    else:
        t = float(kth_smallest_triton(z, m))
    return t, threshold_hint(t, threshold)


def _launch(z, weight, row_inv, col_inv, col_scale, kappa, threshold, hint):
    rows, cols = z.shape
    if z.dtype != torch.float32 or not z.is_contiguous():
        raise ValueError("z must be a contiguous float32 matrix")
    if weight.shape != z.shape or weight.stride(1) != 1:
        raise ValueError(f"weight must be {tuple(z.shape)} with unit column stride, got {tuple(weight.shape)}")
    has_row = row_inv is not None
    buffers = _window_buffers(hint, z.numel(), z.device)
    lo, hi, below, cand, cand_count = buffers
    block_r, block_c, per_program, programs_r = row_tiled(rows, cols, 8, 256, 2048)
    grid = (triton.cdiv(cols, block_c), programs_r)
    _mirror_step_kernel[grid](
        z, below, cand, cand_count, weight,
        row_inv if has_row else col_scale, col_inv if has_row else col_scale, col_scale,
        rows, cols, weight.stride(0), float(kappa), float(threshold), lo, hi, cand.numel(), per_program,
        HAS_ROW=has_row, BLOCK_R=block_r, BLOCK_C=block_c, enable_fp_fusion=False, num_warps=8,
    )
    return buffers


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
    """Update z in place and return (t', hint for the next step): t' is the exact m-th smallest new
    z (`reference.mirror_step_`). hint: what the previous step returned, -1 for none."""
    if not 1 <= m <= z.numel():
        raise ValueError(f"m must be in [1, {z.numel()}], got {m}")
    buffers = _launch(z, weight, row_inv, col_inv, col_scale, kappa, threshold, hint)
    return _threshold(z, m, hint, threshold, buffers)


def candidate_step_triton(z, a, rows, cols, row_inv, col_inv, col_scale, kappa: float, threshold: float, m: int,
                          hint: int = -1) -> tuple[float, int]:
    """The mirror step of the entries (rows[k], cols[k]) of a matrix: z (K,) float32 in place from |W| of
    those entries `a` (K,) float32 and the step vectors; returns (t', hint) as `mirror_step_triton` does,
    t' the exact m-th smallest of z (`reference.candidate_step_`)."""
    n = z.numel()
    if z.dtype != torch.float32 or not z.is_contiguous() or a.shape != z.shape:
        raise ValueError("z must be a contiguous float32 vector, a of its shape")
    if not 1 <= m <= n:
        raise ValueError(f"m must be in [1, {n}], got {m}")
    has_row = row_inv is not None
    buffers = _window_buffers(hint, n, z.device)
    lo, hi, below, cand, cand_count = buffers
    block = 1024
    _candidate_step_kernel[(triton.cdiv(n, block),)](
        z, below, cand, cand_count, a, rows if has_row else cols, cols,
        row_inv if has_row else col_scale, col_inv if has_row else col_scale, col_scale,
        n, float(kappa), float(threshold), lo, hi, cand.numel(),
        HAS_ROW=has_row, BLOCK=block, enable_fp_fusion=False,
    )
    return _threshold(z, m, hint, threshold, buffers)

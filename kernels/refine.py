"""Swap refinement of keep masks (docs/method.md, "Refinement"): the per-row swap loop in Triton.

One program per row runs the row's whole loop (twin: kernels/refine_twin.py, which states the maths and
the arithmetic contract). The row's r and keep live in global memory (updated in place) and are walked
in chunks of BLOCK columns, so any in_features works: per iteration one pass finds p (least a), one its
partner q (least b - ((2 w_p) w) G_p, reading row p of G), one applies the swap
(r <- (r - w_p G_p) + w_q G_q); N:M scores every (pruned, kept) pair of each group of m from the group's
block of G. Chunks combine their minima keeping the earlier one on ties, as the twin's argmin does.
Launched with enable_fp_fusion=False and the twin's order of operations, the masks, r and the swap
counts equal the twin's bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .shared import check_refine_args

BLOCK = 1024  # columns per chunk of the row loops (a power of two)


@triton.jit
def _best_unprune(keep_ptr, r_ptr, w_ptr, diag_ptr, base, cols, BLOCK_C: tl.constexpr):
    """(least a over the row's pruned entries, its column; the first on ties)."""
    best = float("inf")
    where = 0
    for c0 in range(0, cols, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        ok = c < cols
        w = tl.load(w_ptr + base + c, mask=ok, other=0.0)
        r = tl.load(r_ptr + base + c, mask=ok, other=0.0)
        kept = tl.load(keep_ptr + base + c, mask=ok, other=1) != 0
        t = (w * r) * 2.0
        a = tl.where(kept | ~ok, float("inf"), (w * w) * tl.load(diag_ptr + c, mask=ok, other=0.0) - t)
        low = tl.min(a, axis=0)
        at = tl.argmin(a, axis=0, tie_break_left=True)
        where = tl.where(low < best, c0 + at, where)
        best = tl.minimum(low, best)
    return best, where


@triton.jit
def _best_partner(keep_ptr, r_ptr, w_ptr, diag_ptr, g_ptr, base, p, wp, cols, BLOCK_C: tl.constexpr):
    """(least c = b - ((2 w_p) w) G_p over the row's kept entries, its column)."""
    best = float("inf")
    where = 0
    for c0 in range(0, cols, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        ok = c < cols
        w = tl.load(w_ptr + base + c, mask=ok, other=0.0)
        r = tl.load(r_ptr + base + c, mask=ok, other=0.0)
        kept = tl.load(keep_ptr + base + c, mask=ok, other=0) != 0
        t = (w * r) * 2.0
        b = tl.where(kept & ok, (w * w) * tl.load(diag_ptr + c, mask=ok, other=0.0) + t, float("inf"))
        gp = tl.load(g_ptr + p * cols + c, mask=ok, other=0.0)
        cost = b - ((wp * 2.0) * w) * gp
        low = tl.min(cost, axis=0)
        at = tl.argmin(cost, axis=0, tie_break_left=True)
        where = tl.where(low < best, c0 + at, where)
        best = tl.minimum(low, best)
    return best, where


@triton.jit
def _apply_swap(keep_ptr, r_ptr, g_ptr, base, p, q, wp, wq, cols, BLOCK_C: tl.constexpr):
    tl.store(keep_ptr + base + p, 1)
    tl.store(keep_ptr + base + q, 0)
    for c0 in range(0, cols, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        ok = c < cols
        r = tl.load(r_ptr + base + c, mask=ok, other=0.0)
        gp = tl.load(g_ptr + p * cols + c, mask=ok, other=0.0)
        gq = tl.load(g_ptr + q * cols + c, mask=ok, other=0.0)
        tl.store(r_ptr + base + c, (r - wp * gp) + wq * gq, mask=ok)


@triton.jit(do_not_specialize=["cols", "iters"])
def _rows_kernel(keep_ptr, r_ptr, w_ptr, diag_ptr, g_ptr, swaps_ptr, cols, iters, BLOCK_C: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * cols
    done = 0
    go = iters > 0
    while go:
        amin, p = _best_unprune(keep_ptr, r_ptr, w_ptr, diag_ptr, base, cols, BLOCK_C)
        wp = tl.load(w_ptr + base + p)
        cmin, q = _best_partner(keep_ptr, r_ptr, w_ptr, diag_ptr, g_ptr, base, p.to(tl.int64), wp, cols, BLOCK_C)
        go = (amin + cmin) < 0
        if go:
            wq = tl.load(w_ptr + base + q)
            _apply_swap(keep_ptr, r_ptr, g_ptr, base, p.to(tl.int64), q.to(tl.int64), wp, wq, cols, BLOCK_C)
            done += 1
        go = go & (done < iters)
    tl.store(swaps_ptr + tl.program_id(0), done)


@triton.jit(do_not_specialize=["cols", "m", "iters"])
def _nm_kernel(keep_ptr, r_ptr, w_ptr, diag_ptr, g_ptr, swaps_ptr, cols, m, iters, MP: tl.constexpr,
               BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * cols
    groups = cols // m
    i = tl.arange(0, MP)
    done = 0
    go = iters > 0
    while go:
        best = float("inf")
        p = 0
        q = 0
        for g0 in range(0, groups, BLOCK_G):
            g = g0 + tl.arange(0, BLOCK_G)
            ok = (g < groups)[:, None] & (i < m)[None, :]
            col = g[:, None] * m + i[None, :]
            w = tl.load(w_ptr + base + col, mask=ok, other=0.0)
            r = tl.load(r_ptr + base + col, mask=ok, other=0.0)
            kept = tl.load(keep_ptr + base + col, mask=ok, other=0) != 0
            w2g = (w * w) * tl.load(diag_ptr + col, mask=ok, other=0.0)
            t = (w * r) * 2.0
            a = tl.where(kept | ~ok, float("inf"), w2g - t)
            b = tl.where(kept & ok, w2g + t, float("inf"))
            row_col = col.to(tl.int64)[:, :, None] * cols + col[:, None, :]
            pair_ok = ok[:, :, None] & ok[:, None, :]
            block = tl.load(g_ptr + row_col, mask=pair_ok, other=0.0)
            pair = ((w * 2.0)[:, :, None] * w[:, None, :]) * block
            total = a[:, :, None] + (b[:, None, :] - pair)
            flat = tl.reshape(total, (BLOCK_G * MP * MP,))
            low = tl.min(flat, axis=0)
            at = tl.argmin(flat, axis=0, tie_break_left=True)
            first = low < best
            group = g0 + at // (MP * MP)
            p = tl.where(first, group * m + (at // MP) % MP, p)
            q = tl.where(first, group * m + at % MP, q)
            best = tl.minimum(low, best)
        go = best < 0
        if go:
            wp = tl.load(w_ptr + base + p)
            wq = tl.load(w_ptr + base + q)
            _apply_swap(keep_ptr, r_ptr, g_ptr, base, p.to(tl.int64), q.to(tl.int64), wp, wq, cols, BLOCK_C)
            done += 1
        go = go & (done < iters)
    tl.store(swaps_ptr + tl.program_id(0), done)


def _checked(keep, r, w, gram, iters) -> tuple[torch.Tensor, torch.Tensor]:
    """The launchers' checks (the twin's, then the kernel's layout); returns keep as int8 (contiguous) and
    gram's diagonal."""
    check_refine_args(keep, r, w, gram, iters)
    if not (w.is_contiguous() and r.is_contiguous() and keep.is_contiguous() and gram.is_contiguous()):
        raise ValueError("keep, r, w and gram must be contiguous (r and keep are updated in place)")
    if not (w.device == r.device == keep.device == gram.device):
        raise ValueError(f"keep, r, w and gram must be on one device, got {keep.device}, {r.device}, {w.device}, "
                         f"{gram.device}")
    return keep.view(torch.int8), gram.diagonal().contiguous()


def refine_rows_triton(keep: torch.Tensor, r: torch.Tensor, w: torch.Tensor, gram: torch.Tensor,
                       iters: int) -> torch.Tensor:
    """`refine_twin.refine_rows_`: up to `iters` swaps per row, in place on keep and r; swaps per row."""
    keep8, diag = _checked(keep, r, w, gram, iters)
    rows, cols = w.shape
    swaps = torch.zeros(rows, dtype=torch.int32, device=w.device)
    if rows and iters:
        block = min(BLOCK, triton.next_power_of_2(cols))
        _rows_kernel[(rows,)](keep8, r, w, diag, gram, swaps, cols, iters, BLOCK_C=block, enable_fp_fusion=False)
    return swaps


def refine_nm_triton(keep: torch.Tensor, r: torch.Tensor, w: torch.Tensor, gram: torch.Tensor, m: int,
                     iters: int) -> torch.Tensor:
    """`refine_twin.refine_nm_`: up to `iters` swaps inside the groups of m of every row; swaps per row."""
    keep8, diag = _checked(keep, r, w, gram, iters)
    rows, cols = w.shape
    if not (isinstance(m, int) and 1 < m <= 16 and cols % m == 0):
        raise ValueError(f"m must be in 2..16 and divide in_features {cols}, got {m!r}")
    swaps = torch.zeros(rows, dtype=torch.int32, device=w.device)
    if rows and iters:
        mp = triton.next_power_of_2(m)
        block_g = min(triton.next_power_of_2(cols // m), max(1, 2048 // (mp * mp)))
        block = min(BLOCK, triton.next_power_of_2(cols))
        # pair tiles of 2048 entries over 8 warps: 4096 over 4 warps spilled on sm_80 and, for m = 8, on sm_90
        # (benchmarks/aot_compile.py); the tiling never changes the result (the first least pair wins)
        _nm_kernel[(rows,)](keep8, r, w, diag, gram, swaps, cols, m, iters, MP=mp, BLOCK_G=block_g, BLOCK_C=block,
                            num_warps=8, enable_fp_fusion=False)
    return swaps


__all__ = ["refine_nm_triton", "refine_rows_triton"]

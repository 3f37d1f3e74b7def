"""OBS reconstruction kernels (docs/method.md, "Reconstruction"): the Hessian accumulation and the in-block
column sweep.

hessian_accumulate_: h (n, n) float32 += x^T x for x (tokens, n) in bf16/fp16/fp32. Each program owns
one (BLOCK, BLOCK) tile of h and walks the tokens in chunks, `tl.dot` with float32 accumulation (tensor
cores for 16-bit inputs; full-precision "ieee" products for float32 inputs, as torch's default float32
matmul). The sum runs in another order than the twin's matmul: the results agree to rounding, not bit
for bit (neither do torch's own CPU and GPU matmuls).

obs_sweep_: the twin's lazy-batch sweep (`reference.obs_sweep_`) with its in-block part fused: for a
block of up to 128 columns, each program holds a (BLOCK_R, BLOCK_B) tile of rows in registers and
walks the columns: q = the column with its pruned entries zeroed, err = (w - q) / U[i, i], the tile
minus err * U[i, :] (U's row is zero left of i), column i set to q. Products are rounded before they
are subtracted (launched with enable_fp_fusion=False, in the twin's order) and the division is the
correctly rounded one (`div_rn`; Triton's `/` is the approximate div.full.f32 on a GPU), so the tile is
bit-identical to the twin's loop on the same inputs. SparseGPT's N:M rule, which picks each group's mask
from the current weights in the middle of the sweep, runs in the same kernel: at the start of a group,
the ranks of its scores w^2 / U_ii^2 (times the prior) from pairwise comparisons. The unstructured rule
(per block, before the block's sweep) is torch code shared with the twin (`shared.prune_block`). The
trailing update of the later columns is one torch matmul per block, as in the twin.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .shared import prune_block


@triton.jit(do_not_specialize=["tokens"])  # the token count varies by micro-batch
def _hessian_kernel(h_ptr, x_ptr, tokens, n, stride_x, BLOCK: tl.constexpr, BLOCK_T: tl.constexpr,
                    IEEE: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rm = pid_m * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    rn = pid_n * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for t0 in range(0, tokens, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        ok_t = (rt < tokens)[:, None]
        a = tl.load(x_ptr + rt[:, None] * stride_x + rm[None, :], mask=ok_t & (rm < n)[None, :], other=0.0)
        b = tl.load(x_ptr + rt[:, None] * stride_x + rn[None, :], mask=ok_t & (rn < n)[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(tl.trans(a), b, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(a), b, acc)
    offs = rm[:, None] * n + rn[None, :]
    ok = (rm < n)[:, None] & (rn < n)[None, :]
    tl.store(h_ptr + offs, tl.load(h_ptr + offs, mask=ok, other=0.0) + acc, mask=ok)


def hessian_accumulate_triton(h: torch.Tensor, x: torch.Tensor) -> None:
    """h (n, n) float32 += x^T x over the tokens of x (..., n)."""
    n = x.shape[-1]
    if h.shape != (n, n) or h.dtype != torch.float32 or not h.is_contiguous():
        raise ValueError(f"h must be a contiguous float32 ({n}, {n}) tensor, got {h.dtype} {tuple(h.shape)}")
    flat = x.reshape(-1, n)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    tokens = flat.shape[0]
    if tokens == 0:
        return
    block = 64 if n >= 64 else max(16, triton.next_power_of_2(n))
    grid = (triton.cdiv(n, block), triton.cdiv(n, block))
    _hessian_kernel[grid](h, flat, tokens, n, flat.stride(0), BLOCK=block, BLOCK_T=32,
                          IEEE=flat.dtype == torch.float32)


@triton.jit
def _group_choice(w, keep, r, c, d_all, prior_ptr, rows, stride, g0, PRUNE: tl.constexpr, M: tl.constexpr,
                  HAS_PRIOR: tl.constexpr):
    """SparseGPT's N:M rule on the group of columns g0 .. g0 + M - 1 of the tile, from its current weights:
    the PRUNE entries of smallest w^2 / U_ii^2 (times the prior) of every row are pruned, in the order of the
    twin's stable ascending sort (ties to the lower column, NaN last), as ranks from pairwise comparisons."""
    group = ((c >= g0) & (c < g0 + M))[None, :]
    score = tl.math.div_rn(w * w, (d_all * d_all)[None, :])  # the twin's rounding: square, square, divide
    if HAS_PRIOR:  # the group's columns of the prior only, read when the sweep reaches them
        score = score * tl.load(prior_ptr + r[:, None] * stride + c[None, :], mask=(r < rows)[:, None] & group,
                                other=1.0)
    # one int32 key in the sort's order: -0.0 as +0.0 (equal in the sort), every NaN as one value above +inf
    bits = (score + 0.0).to(tl.int32, bitcast=True)
    key = tl.where(score != score, 0x7FC00000, bits ^ ((bits >> 31) & 0x7FFFFFFF))
    rank = tl.zeros(w.shape, dtype=tl.int32)
    for j in tl.static_range(M):
        other = tl.sum(tl.where((c == g0 + j)[None, :], key, 0), axis=1)[:, None]
        rank += ((other < key) | ((other == key) & ((g0 + j) < c)[None, :])).to(tl.int32)
    return tl.where(group, rank >= PRUNE, keep)


@triton.jit
def _obs_block_kernel(w_ptr, err_ptr, keep_ptr, u_ptr, prior_ptr, rows, width, stride_w, stride_u,
                      PRUNE: tl.constexpr, M: tl.constexpr, HAS_PRIOR: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    c = tl.arange(0, BLOCK_B)
    ok = (r < rows)[:, None] & (c < width)[None, :]
    offs = r[:, None] * stride_w + c[None, :]
    w = tl.load(w_ptr + offs, mask=ok, other=0.0)
    keep = tl.load(keep_ptr + offs, mask=ok, other=1) != 0
    d_all = tl.load(u_ptr + c * stride_u + c, mask=c < width, other=1.0)
    for g0 in range(0, width, M):  # M = 1 unless the N:M rule chooses the mask group by group
        if PRUNE > 0:
            keep = _group_choice(w, keep, r, c, d_all, prior_ptr, rows, stride_w, g0, PRUNE, M, HAS_PRIOR)
        for i in range(g0, g0 + M):
            here = (c == i)[None, :]
            col = tl.sum(tl.where(here, w, -0.0), axis=1)  # -0.0: an exact extraction, signed zeros kept
            kept = tl.sum(tl.where(here & keep, 1, 0), axis=1) > 0
            q = tl.where(kept, col, 0.0)
            d = tl.load(u_ptr + i * stride_u + i)
            later = (c > i) & (c < width)
            u_row = tl.load(u_ptr + i * stride_u + c, mask=later, other=0.0)
            err = tl.math.div_rn(col - q, d)  # `/` would be div.full.f32 (2 ulp) on a GPU
            # the twin updates only the later columns: elsewhere w - err * 0 could flip a zero's sign
            w = tl.where(here, q[:, None], tl.where(later[None, :], w - err[:, None] * u_row[None, :], w))
            tl.store(err_ptr + r * stride_w + i, err, mask=r < rows)  # a column at a time: no tile held
    tl.store(w_ptr + offs, w, mask=ok)
    if PRUNE > 0:
        tl.store(keep_ptr + offs, keep.to(tl.int8), mask=ok)


def obs_sweep_triton(w, u, keep=None, prune_count=None, nm=None, blocksize=128, prior=None):
    """`reference.obs_sweep_` with the in-block sweep fused (see the module docstring)."""
    rows, cols = w.shape
    choose = keep is None
    keep = torch.ones_like(w, dtype=torch.bool) if choose else keep.clone()
    prune, m = 0, 1
    if choose and nm is not None:
        n, m = nm
        if not 0 < n < m or cols % m:
            raise ValueError(f"need 0 < n < m and in_features % m == 0, got n={n}, m={m}, in={cols}")
        prune = m - n
        blocksize = max(m, blocksize // m * m)  # a group never straddles two blocks
    d = u.diagonal()
    block_b = triton.next_power_of_2(min(blocksize, cols))
    block_r = max(1, min(8, 1024 // block_b))
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        if choose and nm is None:
            prune_block(w, keep, d, prune_count, prior, (i1, i2))
        w1 = w[:, i1:i2].contiguous()
        k1 = keep[:, i1:i2].contiguous().view(torch.int8)
        u1 = u[i1:i2, i1:i2].contiguous()
        p1 = prior[:, i1:i2].contiguous() if prune and prior is not None else w1
        err1 = torch.empty_like(w1)
        _obs_block_kernel[(triton.cdiv(rows, block_r),)](
            w1, err1, k1, u1, p1, rows, i2 - i1, w1.stride(0), u1.stride(0),
            PRUNE=prune, M=m, HAS_PRIOR=p1 is not w1, BLOCK_R=block_r, BLOCK_B=block_b, enable_fp_fusion=False,
            num_warps=4, maxnreg=128,
        )
        if prune:
            keep[:, i1:i2] = k1.view(torch.bool)
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    w.masked_fill_(~keep, 0.0)
    return keep

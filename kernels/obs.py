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
are subtracted (launched with enable_fp_fusion=False, in the twin's order), so the tile is bit-identical
to the twin's loop on the same inputs. The trailing update of the later columns is one torch matmul
per block, as in the twin. SparseGPT's N:M rule picks each group's mask from the current weights in the
middle of the sweep: that case runs the twin.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference as R


@triton.jit
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
def _obs_block_kernel(w_ptr, err_ptr, keep_ptr, u_ptr, rows, width, stride_w, stride_u,
                      BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    c = tl.arange(0, BLOCK_B)
    ok = (r < rows)[:, None] & (c < width)[None, :]
    offs = r[:, None] * stride_w + c[None, :]
    w = tl.load(w_ptr + offs, mask=ok, other=0.0)
    keep = tl.load(keep_ptr + offs, mask=ok, other=1) != 0
    errs = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.float32)
    for i in range(0, width):
        here = (c == i)[None, :]
        col = tl.sum(tl.where(here, w, 0.0), axis=1)
        kept = tl.sum(tl.where(here & keep, 1, 0), axis=1) > 0
        q = tl.where(kept, col, 0.0)
        d = tl.load(u_ptr + i * stride_u + i)
        u_row = tl.load(u_ptr + i * stride_u + c, mask=(c >= i) & (c < width), other=0.0)
        err = (col - q) / d
        w = w - err[:, None] * u_row[None, :]
        w = tl.where(here, q[:, None], w)
        errs = tl.where(here, err[:, None], errs)
    tl.store(w_ptr + offs, w, mask=ok)
    tl.store(err_ptr + offs, errs, mask=ok)


def obs_sweep_triton(w, u, keep=None, prune_count=None, nm=None, blocksize=128, prior=None):
    """`reference.obs_sweep_` with the in-block sweep fused (see the module docstring)."""
    if keep is None and nm is not None:
        return R.obs_sweep_(w, u, keep, prune_count, nm, blocksize, prior)
    rows, cols = w.shape
    choose = keep is None
    keep = torch.ones_like(w, dtype=torch.bool) if choose else keep.clone()
    d = u.diagonal()
    block_b = triton.next_power_of_2(min(blocksize, cols))
    block_r = max(1, min(32, 4096 // block_b))
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        if choose:  # SparseGPT's per-block rule, from the weights as the sweep reaches the block
            count = prune_count * i2 // cols - prune_count * i1 // cols
            score = w[:, i1:i2].square() / d[i1:i2].square()
            flat = R._smallest_flat(score if prior is None else score * prior[:, i1:i2], count)
            keep[:, i1:i2][flat // (i2 - i1), flat % (i2 - i1)] = False
        w1 = w[:, i1:i2].contiguous()
        k1 = keep[:, i1:i2].contiguous().view(torch.int8)
        u1 = u[i1:i2, i1:i2].contiguous()
        err1 = torch.empty_like(w1)
        _obs_block_kernel[(triton.cdiv(rows, block_r),)](
            w1, err1, k1, u1, rows, i2 - i1, w1.stride(0), u1.stride(0),
            BLOCK_R=block_r, BLOCK_B=block_b, enable_fp_fusion=False,
        )
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    w.masked_fill_(~keep, 0.0)
    return keep

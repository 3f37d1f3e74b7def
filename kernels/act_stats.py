"""Activation statistics: sqsum[j] += sum_t x[t, j]^2 for a (tokens, in_features) block, in place.

x: (..., in) float32 / float16 / bfloat16, any leading shape (flattened to tokens); sqsum: (in,)
float64. Squares of these dtypes are exact in float64 and the sum is accumulated in float64, so the
result differs from the torch twin only by float64 summation order (far below the float32 rounding
of the per-step vectors computed from it). The grid is (column blocks, token chunks): each program
writes the partial sum of its chunk, and the partials are added in a fixed order afterwards, so the
result is deterministic (no atomics) while enough programs run to fill the GPU. Twin:
`reference.act_sqsum_`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# token counts vary from call to call (the last micro-batch): never specialised on, one compile per dtype
@triton.jit(do_not_specialize=["tokens", "chunk"])
def _act_sqsum_kernel(
    partial_ptr,
    x_ptr,
    tokens,
    cols,
    stride_t,
    chunk,
    EXACT_F32_SQUARE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1).to(tl.int64)
    col = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = col < cols
    # a (BLOCK_T, BLOCK_C) float64 accumulator: one elementwise add per tile, one reduction at the end
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float64)
    first = pid_t * chunk
    for start in range(0, chunk, BLOCK_T):
        row = first + start + tl.arange(0, BLOCK_T).to(tl.int64)
        ok = ((row < tokens) & (row < first + chunk))[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + row[:, None] * stride_t + col[None, :], mask=ok, other=0.0)
        if EXACT_F32_SQUARE:  # fp16/bf16: the float32 square is exact (at most 22 significant bits)
            xf = x.to(tl.float32)
            acc += (xf * xf).to(tl.float64)
        else:
            xd = x.to(tl.float64)
            acc += xd * xd
    tl.store(partial_ptr + pid_t * cols + col, tl.sum(acc, axis=0), mask=col_ok)


def act_sqsum_triton(sqsum: torch.Tensor, x: torch.Tensor) -> int:
    """sqsum (in,) float64 += sum over tokens of x^2; returns the number of tokens."""
    cols = x.shape[-1]
    if sqsum.dtype != torch.float64 or sqsum.shape != (cols,) or not sqsum.is_contiguous():
        raise ValueError(f"sqsum must be a contiguous float64 vector of {cols} entries")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    x2 = x.reshape(-1, cols)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    tokens = x2.shape[0]
    if tokens == 0:
        return 0
    block_c, block_t = 128, 16
    col_blocks = triton.cdiv(cols, block_c)
    # about 2048 programs in all (enough to fill a GPU), chunks a multiple of BLOCK_T tokens
    chunks = max(1, min(triton.cdiv(tokens, block_t), 2048 // col_blocks))
    chunk = triton.cdiv(triton.cdiv(tokens, chunks), block_t) * block_t
    chunks = triton.cdiv(tokens, chunk)
    partial = torch.empty((chunks, cols), dtype=torch.float64, device=x2.device)
    _act_sqsum_kernel[(col_blocks, chunks)](
        partial, x2, tokens, cols, x2.stride(0), chunk, EXACT_F32_SQUARE=x2.dtype != torch.float32,
        BLOCK_T=block_t, BLOCK_C=block_c,
    )
    sqsum += partial.sum(dim=0)
    return tokens

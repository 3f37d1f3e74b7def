"""N:M masks: keep the N largest of every M consecutive keys of a row (any 0 < N < M <= 16).

keys: (out, in) int64 rank keys (`reference.rank_keys`), in % M == 0. Within a group an entry's rank
is the number of entries with a larger key, or an equal key and a lower index (the total order of
docs/method.md, "Masks"); it is kept when its rank is below N. Each program loads a tile of groups as a
(groups, M) block and compares all M x M pairs in registers: one read of the keys, one write of the
mask. Twin: `reference.nm_mask`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _nm_mask_kernel(
    keep_ptr,
    keys_ptr,
    groups,
    n,
    M: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    g = pid * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)
    j = tl.arange(0, M)
    offs = g[:, None] * M + j[None, :]
    ok = (g < groups)[:, None]
    key = tl.load(keys_ptr + offs, mask=ok, other=0)
    mine = key[:, :, None]  # (G, M, 1): the entry being ranked
    other = key[:, None, :]  # (G, 1, M): the entries it is compared with
    earlier = (j[None, None, :] < j[None, :, None])
    beats = (other > mine) | ((other == mine) & earlier)
    rank = tl.sum(beats.to(tl.int32), axis=2)
    tl.store(keep_ptr + offs, (rank < n).to(tl.int8), mask=ok)


def nm_mask_triton(keys: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """bool mask (out, in): the n largest keys of every m consecutive entries of a row."""
    rows, cols = keys.shape
    if not 0 < n < m <= 16 or cols % m:
        raise ValueError(f"need 0 < n < m <= 16 and in_features % m == 0, got n={n}, m={m}, in={cols}")
    flat = keys.contiguous()
    keep = torch.empty((rows, cols), dtype=torch.int8, device=keys.device)
    groups = rows * cols // m
    m_pow2 = triton.next_power_of_2(m)
    if m_pow2 != m:  # tl.arange needs a power of two: pad each group with keys that never win
        pad = torch.full((rows, cols // m, m_pow2 - m), -(1 << 63), dtype=torch.int64, device=keys.device)
        padded = torch.cat([flat.reshape(rows, cols // m, m), pad], dim=2).contiguous()
        out = torch.empty_like(padded, dtype=torch.int8)
        block = max(1, 4096 // (m_pow2 * m_pow2))
        _nm_mask_kernel[(triton.cdiv(groups, block),)](out, padded, groups, n, M=m_pow2, BLOCK_G=block)
        return out[..., :m].reshape(rows, cols).view(torch.bool)
    block = max(1, 4096 // (m * m))
    _nm_mask_kernel[(triton.cdiv(groups, block),)](keep, flat, groups, n, M=m, BLOCK_G=block)
    return keep.view(torch.bool)

"""Exact selection by radix select on the key bits: no sort, no concatenated copy.

Keys: float32 values (mapped to their order-preserving 32-bit unsigned key) or the int64 rank keys of
`reference.rank_keys` (shifted to [0, 2^63)). A pass builds the histogram of the next 11-bit digit
of every key that matches the prefix found so far, over one tensor or a list of tensors (each adds to
the same histogram): 3 passes for float32, 6 for rank keys. Serves:
  kth_smallest_triton(values, k)            exact k-th smallest (the lam threshold; select fallback)
  topk_mask_triton(keys, k)                 keep the k largest keys, ties to the lower flat index
  row_topk_mask_triton(keys, k)             the same per row, one program per row, in-kernel radix
  global_keep_counts_triton(...)            the global budget with bounds (water-filling, shared
                                            logic with the twin, histograms from the kernel)
Twins: `reference.kth_smallest`, `topk_mask`, `row_topk_mask`, `global_keep_counts`.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

DIGIT_BITS = 11
_OFFSET = 1 << 62
_FLOAT, _RANK = 0, 1
_BLOCK = 1024


@triton.jit
def _ordered_key(raw, KIND: tl.constexpr):
    """int64 order-preserving key: float32 -> [0, 2^32), int64 rank key -> [0, 2^63)."""
    if KIND == 0:
        bits = raw.to(tl.int32, bitcast=True)
        key32 = bits ^ ((bits >> 31) | -2147483648)
        return key32.to(tl.int64) & 0xFFFFFFFF
    else:
        return raw + 4611686018427387904  # 2^62


@triton.jit
def _digit_hist_kernel(
    hist_ptr,
    keys_ptr,
    n,
    prefix,
    prefix_shift,
    digit_shift,
    tiles_per_program,
    KIND: tl.constexpr,
    FIRST: tl.constexpr,
    DIGIT_BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    hist = tl.zeros((1 << DIGIT_BITS,), dtype=tl.int32)
    for i in range(0, tiles_per_program):
        offs = (pid * tiles_per_program + i) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        ok = offs < n
        key = _ordered_key(tl.load(keys_ptr + offs, mask=ok, other=0), KIND)
        if not FIRST:
            ok = ok & ((key >> prefix_shift) == prefix)
        digit = ((key >> digit_shift) & ((1 << DIGIT_BITS) - 1)).to(tl.int32)
        hist += tl.histogram(digit, 1 << DIGIT_BITS, mask=ok)
    bins = tl.arange(0, 1 << DIGIT_BITS)
    tl.atomic_add(hist_ptr + bins, hist, mask=hist > 0)


def _grid(n: int) -> tuple[int, int]:
    tiles = triton.cdiv(n, _BLOCK)
    per_program = triton.cdiv(tiles, min(tiles, 2048))
    return triton.cdiv(tiles, per_program), per_program


def digit_histogram_triton(
    hist: torch.Tensor, keys: torch.Tensor, prefix: int, prefix_shift: int, digit_shift: int, kind: int
) -> None:
    """hist (2^DIGIT_BITS,) int32 += counts of the digit at `digit_shift` of the keys whose bits above
    `prefix_shift` equal `prefix` (prefix_shift >= key bits: every key)."""
    flat = keys.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if flat.numel() == 0:
        return
    programs, per_program = _grid(flat.numel())
    first = prefix_shift >= (32 if kind == _FLOAT else 63)  # the top digit: every key matches
    _digit_hist_kernel[(programs,)](
        hist, flat, flat.numel(), prefix, min(prefix_shift, 63), digit_shift, per_program,
        KIND=kind, FIRST=first, DIGIT_BITS=DIGIT_BITS, BLOCK=_BLOCK,
    )


def radix_select(tensors: list[torch.Tensor], k: int, kind: int) -> tuple[int, int, int]:
    """The k-th smallest (1-based) ordered key over all tensors, exactly.

    Digits of DIGIT_BITS from the top of the key padded to a whole number of digits. Returns (key,
    count of keys below it, count equal to it)."""
    passes = triton.cdiv(32 if kind == _FLOAT else 63, DIGIT_BITS)
    device = tensors[0].device
    prefix, rank, below, equal = 0, k, 0, 0
    for p in range(passes):
        digit_shift = (passes - 1 - p) * DIGIT_BITS
        hist = torch.zeros(1 << DIGIT_BITS, dtype=torch.int32, device=device)
        for t in tensors:
            digit_histogram_triton(hist, t, prefix, digit_shift + DIGIT_BITS, digit_shift, kind)
        cum = hist.to(torch.int64).cumsum(0)
        b = int(torch.searchsorted(cum, torch.tensor([rank], dtype=torch.int64, device=device)).item())
        before = int(cum[b - 1]) if b > 0 else 0
        equal = int(hist[b])
        rank -= before
        below += before
        prefix = (prefix << DIGIT_BITS) | b
    return prefix, below, equal


def _key_to_float(key: int) -> float:
    bits = key - (1 << 31) if key >= (1 << 31) else (~key) & 0xFFFFFFFF
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def kth_smallest_triton(values: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th smallest (1-based) of a float32 or int64 (rank key) tensor, as a 0-d tensor."""
    n = values.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if values.dtype == torch.float32:
        key, _, _ = radix_select([values], k, _FLOAT)
        return torch.tensor(_key_to_float(key), dtype=torch.float32, device=values.device)
    if values.dtype == torch.int64:
        key, _, _ = radix_select([values], k, _RANK)
        return torch.tensor(key - _OFFSET, dtype=torch.int64, device=values.device)
    raise ValueError(f"values must be float32 or int64, got {values.dtype}")


@triton.jit
def _threshold_mask_kernel(
    keep_ptr,
    tie_ptr,
    tie_count_ptr,
    keys_ptr,
    n,
    kth,
    tie_cap,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = offs < n
    key = tl.load(keys_ptr + offs, mask=ok, other=-9223372036854775807)
    tl.store(keep_ptr + offs, (key > kth).to(tl.int8), mask=ok)
    tie = (ok & (key == kth)).to(tl.int32)
    count = tl.sum(tie, axis=0)
    if count > 0:
        base = tl.atomic_add(tie_count_ptr, count)
        pos = base + tl.cumsum(tie, axis=0) - 1
        tl.store(tie_ptr + pos, offs, mask=(tie > 0) & (pos < tie_cap))


def topk_mask_triton(keys: torch.Tensor, k: int) -> torch.Tensor:
    """bool mask keeping the k largest int64 rank keys; ties at the boundary to the lower flat index."""
    n = keys.numel()
    if k <= 0:
        return torch.zeros_like(keys, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(keys, dtype=torch.bool)
    flat = keys.reshape(-1).contiguous()
    key, below, equal = radix_select([flat], n - k + 1, _RANK)
    kth = key - _OFFSET
    above = n - below - equal
    need = k - above  # ties to keep, 1 <= need <= equal
    keep = torch.empty(n, dtype=torch.int8, device=keys.device)
    tie_cap = max(1024, min(equal, 1 << 24))
    ties = torch.empty(tie_cap, dtype=torch.int64, device=keys.device)
    tie_count = torch.zeros(1, dtype=torch.int32, device=keys.device)
    _threshold_mask_kernel[(triton.cdiv(n, _BLOCK),)](keep, ties, tie_count, flat, n, kth, tie_cap, BLOCK=_BLOCK)
    if equal <= tie_cap:
        chosen = ties[:equal].sort().values[:need]  # programs append in any order: sort, then cut
    else:
        chosen = (flat == kth).nonzero().flatten()[:need]
    keep[chosen] = 1
    return keep.view(torch.bool).reshape(keys.shape)


@triton.jit
def _row_topk_kernel(
    keep_ptr,
    keys_ptr,
    cols,
    stride_r,
    k,
    BLOCK: tl.constexpr,
    DIGIT_BITS: tl.constexpr,
    PASSES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = keys_ptr + row * stride_r
    nb: tl.constexpr = 1 << DIGIT_BITS
    bins = tl.arange(0, nb)
    rank = (cols - k + 1).to(tl.int64)  # the kth largest is the (cols - k + 1)-th smallest
    prefix = tl.zeros((), dtype=tl.int64)
    below = tl.zeros((), dtype=tl.int64)
    equal = tl.zeros((), dtype=tl.int64)
    for p in tl.static_range(PASSES):
        digit_shift: tl.constexpr = (PASSES - 1 - p) * DIGIT_BITS
        hist = tl.zeros((nb,), dtype=tl.int32)
        for start in range(0, cols, BLOCK):
            offs = start + tl.arange(0, BLOCK).to(tl.int64)
            ok = offs < cols
            key = tl.load(base + offs, mask=ok, other=0) + 4611686018427387904
            if p > 0:
                ok = ok & ((key >> (digit_shift + DIGIT_BITS)) == prefix)
            digit = ((key >> digit_shift) & (nb - 1)).to(tl.int32)
            hist += tl.histogram(digit, nb, mask=ok)
        cum = tl.cumsum(hist.to(tl.int64), axis=0)
        b = tl.sum((cum < rank).to(tl.int64), axis=0)
        before = tl.sum(tl.where(bins.to(tl.int64) < b, hist.to(tl.int64), 0), axis=0)
        equal = tl.sum(tl.where(bins.to(tl.int64) == b, hist.to(tl.int64), 0), axis=0)
        rank -= before
        below += before
        prefix = prefix * nb + b
    kth = prefix - 4611686018427387904
    need = k - (cols - below - equal)
    seen = tl.zeros((), dtype=tl.int64)
    for start in range(0, cols, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        ok = offs < cols
        key = tl.load(base + offs, mask=ok, other=0)
        tie = (ok & (key == kth)).to(tl.int64)
        tie_rank = seen + tl.cumsum(tie, axis=0)
        keep = (key > kth) | ((tie > 0) & (tie_rank <= need))
        tl.store(keep_ptr + row * cols + offs, keep.to(tl.int8), mask=ok)
        seen += tl.sum(tie, axis=0)


def row_topk_mask_triton(keys: torch.Tensor, k: int) -> torch.Tensor:
    """keys (out, in) int64: keep the k largest of every row, ties to the lower column index."""
    rows, cols = keys.shape
    if k <= 0:
        return torch.zeros_like(keys, dtype=torch.bool)
    if k >= cols:
        return torch.ones_like(keys, dtype=torch.bool)
    if keys.stride(1) != 1:
        keys = keys.contiguous()
    keep = torch.empty((rows, cols), dtype=torch.int8, device=keys.device)
    _row_topk_kernel[(rows,)](keep, keys, cols, keys.stride(0), k, BLOCK=_BLOCK, DIGIT_BITS=DIGIT_BITS,
                              PASSES=triton.cdiv(63, DIGIT_BITS))
    return keep.view(torch.bool)


def global_keep_counts_triton(
    keys: list[torch.Tensor], total_keep: int, lower: list[int], upper: list[int]
) -> list[int]:
    """Per-matrix kept counts of the global budget with bounds (see `reference.global_keep_counts`)."""
    from .reference import water_fill

    def histogram(key: torch.Tensor, prefix: int, prefix_shift: int, digit_shift: int) -> torch.Tensor:
        hist = torch.zeros(1 << DIGIT_BITS, dtype=torch.int32, device=key.device)
        digit_histogram_triton(hist, key, prefix, prefix_shift, digit_shift, _RANK)
        return hist.to(torch.int64).cpu()

    return water_fill(keys, total_keep, lower, upper, histogram, DIGIT_BITS)


@triton.jit
def _rank_keys_kernel(keys_ptr, z_ptr, w_ptr, rows, cols, stride_w, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = offs < rows * cols
    r = offs // cols
    c = offs - r * cols
    zb = tl.load(z_ptr + offs, mask=ok, other=0.0).to(tl.int32, bitcast=True)
    zkey = (zb ^ ((zb >> 31) & 0x7FFFFFFF)).to(tl.int64)
    w = tl.abs(tl.load(w_ptr + r * stride_w + c, mask=ok, other=0.0).to(tl.float32))
    wkey = w.to(tl.int32, bitcast=True).to(tl.int64)
    tl.store(keys_ptr + offs, zkey * 2147483648 + wkey, mask=ok)


def rank_keys_triton(z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """int64 keys ordering entries by (z, |W|): `reference.rank_keys` in one elementwise pass."""
    if z.dtype != torch.float32 or z.shape != weight.shape:
        raise ValueError("z must be float32 and shaped like weight")
    z = z.contiguous()
    if weight.dim() != 2 or weight.stride(1) != 1:
        weight = weight.reshape(z.shape).contiguous()
    rows, cols = z.shape if z.dim() == 2 else (1, z.numel())
    keys = torch.empty(z.shape, dtype=torch.int64, device=z.device)
    _rank_keys_kernel[(triton.cdiv(z.numel(), _BLOCK),)](keys, z, weight, rows, cols,
                                                       weight.stride(0) if weight.dim() == 2 else cols,
                                                       BLOCK=_BLOCK)
    return keys

"""Exact selection by sample-select: a bracket from a sample, one counting pass, a small sort.

Keys: float32 values (mapped to their order-preserving key in [0, 2^32)) or the int64 rank keys of
`reference.rank_keys` (shifted to [0, 2^63)). To find the k-th smallest over one tensor or a list:
  1. draw a fixed-seed sample of up to 2^20 keys (sorted: a few hundred microseconds) and take a
     bracket [lo, hi] around the sample quantile k/n, wide enough (4 standard deviations of the
     sample rank plus a margin) to hold the answer with near certainty;
  2. one pass over the data (`_bracket_kernel`): count the keys below lo, copy the keys in [lo, hi]
     into a candidate buffer (per-tile compaction with one atomic per tile);
  3. if below < k <= below + candidates, the answer is a sorted candidate (about 0.4% of the data at
     most); else widen the bracket and pass again (the result never depends on the sample, only the
     time does). No histogram, no sort of the data, no concatenated copy.
Serves:
  kth_smallest_triton(values, k)            the lam threshold (first step, and when its window misses)
  topk_mask_triton(keys, k)                 keep the k largest keys, ties to the lower flat index
  rank_keys_triton(z, weight)               the int64 (z, |W|) rank keys, one elementwise pass
(The per-row top-k and the global water-filling are torch code both backends run: shared.py.)
Twins: `reference.kth_smallest`, `topk_mask`, `rank_keys`.
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

_OFFSET = 1 << 62
_FLOAT, _RANK = 0, 1
_BLOCK = 1024
_SAMPLE = 1 << 20
_MAX_KEY = (1 << 63) - 1


@triton.jit
def _ordered_key(raw, KIND: tl.constexpr):
    """int64 order-preserving key: float32 -> [0, 2^32), int64 rank key -> [0, 2^63)."""
    if KIND == 0:
        bits = raw.to(tl.int32, bitcast=True)
        key32 = bits ^ ((bits >> 31) | -2147483648)
        return key32.to(tl.int64) & 4294967295
    else:
        return raw + 4611686018427387904  # 2^62


# Integer arguments that are data (bracket bounds, keys, capacities) or may pass 2^31 (counts) get a fixed
# type and no specialisation on their value: one compile per kind and arch, never a new one mid-run.
@triton.jit(do_not_specialize=["lo", "hi", "cap", "tiles_per_program"])
def _bracket_kernel(
    below_ptr,
    cand_ptr,
    cand_count_ptr,
    keys_ptr,
    n: tl.int64,
    lo: tl.int64,
    hi: tl.int64,
    cap: tl.int64,
    tiles_per_program,
    KIND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    below = tl.zeros((), dtype=tl.int64)
    for i in range(0, tiles_per_program):
        offs = (pid * tiles_per_program + i) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        ok = offs < n
        key = _ordered_key(tl.load(keys_ptr + offs, mask=ok, other=0), KIND)
        below += tl.sum((ok & (key < lo)).to(tl.int64), axis=0)
        take = (ok & (key >= lo) & (key <= hi)).to(tl.int64)
        count = tl.sum(take, axis=0)
        if count > 0:
            base = tl.atomic_add(cand_count_ptr, count)
            pos = base + tl.cumsum(take, axis=0) - 1
            tl.store(cand_ptr + pos, key, mask=(take > 0) & (pos < cap))
    tl.atomic_add(below_ptr, below)


def _grid(n: int) -> tuple[int, int]:
    tiles = triton.cdiv(n, _BLOCK)
    per_program = triton.cdiv(tiles, min(tiles, 4096))
    return triton.cdiv(tiles, per_program), per_program


def ordered_keys_torch(values: torch.Tensor) -> torch.Tensor:
    """The kernels' order-preserving int64 key of float32 values or int64 rank keys, in torch."""
    if values.dtype == torch.float32:
        bits = values.contiguous().view(torch.int32).to(torch.int64)
        return torch.where(bits < 0, ~bits & 0xFFFFFFFF, bits | 0x80000000)
    return values + _OFFSET


def bracket(tensors: list[torch.Tensor], kind: int, lo: int, hi: int, cap: int):
    """(count of keys < lo, candidate keys in [lo, hi] (unsorted) or None if more than `cap`)."""
    device = tensors[0].device
    below = torch.zeros(1, dtype=torch.int64, device=device)
    cand = torch.empty(max(cap, 1), dtype=torch.int64, device=device)
    count = torch.zeros(1, dtype=torch.int64, device=device)  # int64: a window may hold > 2^31 ties
    for t in tensors:
        flat = t.reshape(-1)
        if flat.numel() == 0:
            continue
        programs, per_program = _grid(flat.numel())
        _bracket_kernel[(programs,)](below, cand, count, flat, flat.numel(), lo, hi, cand.numel(), per_program,
                                     KIND=kind, BLOCK=_BLOCK)
    below_n, count_n = (int(v) for v in torch.cat([below, count]).tolist())
    return below_n, (cand[:count_n] if count_n <= cap else None), count_n


def _sample(tensors: list[torch.Tensor], total: int) -> torch.Tensor:
    """Sorted ordered keys of a fixed-seed sample (the sample only decides speed, never the result)."""
    size = min(_SAMPLE, total)
    gen = torch.Generator(device=tensors[0].device).manual_seed(0x5E1EC7)
    parts = []
    for t in tensors:
        flat = t.reshape(-1)
        share = max(1, round(size * flat.numel() / total)) if flat.numel() else 0
        if share:
            idx = torch.randint(0, flat.numel(), (share,), generator=gen, device=flat.device)
            parts.append(ordered_keys_torch(flat[idx]))
    return torch.cat(parts).sort().values


def select_key(tensors: list[torch.Tensor], k: int, kind: int) -> tuple[int, int, int]:
    """The k-th smallest (1-based) ordered key over all tensors, exactly.

    Returns (key, count of keys below it, count equal to it)."""
    tensors = [t if t.is_contiguous() else t.contiguous() for t in tensors]
    total = sum(t.numel() for t in tensors)
    if not 1 <= k <= total:
        raise ValueError(f"k must be in [1, {total}], got {k}")
    sample = _sample(tensors, total)
    s = sample.numel()
    q = (k - 0.5) / total
    spread = 4 * math.sqrt(s * q * (1 - q)) + 32
    while True:
        pos = q * s
        lo_i, hi_i = math.floor(pos - spread), math.ceil(pos + spread)
        lo = int(sample[lo_i]) if lo_i >= 0 else -1
        hi = int(sample[hi_i]) if hi_i < s else _MAX_KEY
        expected = (min(hi_i, s) - max(lo_i, 0) + 1) / s * total
        cap = int(2 * expected) + 4096 if (lo_i >= 0 or hi_i < s) else total
        below, cand, count = bracket(tensors, kind, lo, hi, cap)
        if below < k <= below + count:
            if cand is None:  # the bracket holds the answer but too many keys (heavy ties): bisect it
                return _bisect(tensors, kind, k, lo, hi)
            ordered = cand.sort().values
            key = int(ordered[k - below - 1])
            less = int(torch.searchsorted(ordered, torch.tensor([key], device=ordered.device)).item())
            more = int(torch.searchsorted(ordered, torch.tensor([key], device=ordered.device), right=True).item())
            return key, below + less, more - less
        spread *= 8  # the bracket missed: widen it; at worst it covers everything


def _bisect(tensors: list[torch.Tensor], kind: int, k: int, lo: int, hi: int) -> tuple[int, int, int]:
    """The k-th smallest key in [lo, hi] by bisection on the key value, counting passes only."""
    while lo < hi:
        mid = (lo + hi) // 2
        below_mid, _, _ = bracket(tensors, kind, mid + 1, mid, 0)  # empty window: counts keys <= mid
        if below_mid >= k:
            hi = mid
        else:
            lo = mid + 1
    below, _, equal = bracket(tensors, kind, lo, lo, 0)
    return lo, below, equal


def _key_to_float(key: int) -> float:
    bits = key - (1 << 31) if key >= (1 << 31) else (~key) & 0xFFFFFFFF
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def kth_smallest_triton(values: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th smallest (1-based) of a float32 or int64 (rank key) tensor, as a 0-d tensor."""
    if values.dtype == torch.float32:
        key, _, _ = select_key([values], k, _FLOAT)
        return torch.tensor(_key_to_float(key), dtype=torch.float32, device=values.device)
    if values.dtype == torch.int64:
        key, _, _ = select_key([values], k, _RANK)
        return torch.tensor(key - _OFFSET, dtype=torch.int64, device=values.device)
    raise ValueError(f"values must be float32 or int64, got {values.dtype}")


@triton.jit(do_not_specialize=["kth", "tie_cap"])
def _threshold_mask_kernel(
    keep_ptr,
    tie_ptr,
    tie_count_ptr,
    keys_ptr,
    n: tl.int64,
    kth: tl.int64,
    tie_cap: tl.int64,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = offs < n
    key = tl.load(keys_ptr + offs, mask=ok, other=-9223372036854775807)
    tl.store(keep_ptr + offs, (key > kth).to(tl.int8), mask=ok)
    tie = (ok & (key == kth)).to(tl.int64)
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
    key, below, equal = select_key([flat], n - k + 1, _RANK)
    kth = key - _OFFSET
    above = n - below - equal
    need = k - above  # ties to keep, 1 <= need <= equal
    keep = torch.empty(n, dtype=torch.int8, device=keys.device)
    tie_cap = max(1024, min(equal, 1 << 24))
    ties = torch.empty(tie_cap, dtype=torch.int64, device=keys.device)
    tie_count = torch.zeros(1, dtype=torch.int64, device=keys.device)
    _threshold_mask_kernel[(triton.cdiv(n, _BLOCK),)](keep, ties, tie_count, flat, n, kth, tie_cap, BLOCK=_BLOCK)
    if equal <= tie_cap:
        chosen = ties[:equal].sort().values[:need]  # programs append in any order: sort, then cut
    else:
        chosen = (flat == kth).nonzero().flatten()[:need]
    keep[chosen] = 1
    return keep.view(torch.bool).reshape(keys.shape)


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

"""The torch code every backend runs: the Triton launchers and the torch backend alike. Nothing here is an
oracle: the tests hold these pieces to independent statements (tests/test_reference.py, test_subsets.py),
and the kernels to the twins of reference.py, which the Triton files never import
(tests/test_architecture.py).

- keyed hashing and the stochria subsets (`derive_key`, `subset_vectors`, `stochastic_subset_sums`): the
  one place subsets are made, so every backend, rank and resume sees the same ones;
- the step vectors' float64 finish (`channel_factor`, `finish_step_vectors`, `StepVectors`), read from the
  metric registry (metric_registry.py): backends agree bit for bit because they all finish here;
- the mirror step's selection hint (`threshold_hint`), which only decides speed;
- the selections that both backends run in torch (`topk_mask`, `row_topk_mask`: torch's `kthvalue`, one
  block per row on a GPU; `global_keep_counts`: radix water-filling with `bincount` histograms);
- the OBS pieces around the sweep (`obs_inverse_factor`, `prune_block`: SparseGPT's per-block rule).

The stochria subsets: sums run over keyed subsets of exactly tau entries of every row and every column
(`subset_vectors`, keyed by derive_key(seed, matrix, step)). pos_c is a keyed order of the columns
(ranks under the unique sort keys hash(j) * 2^31 + j) and off_r[i] a keyed offset mod in; row i takes the
columns at positions off_r[i], ..., off_r[i] + tau - 1 (mod in) of that order. A window of tau distinct
positions of a permutation holds exactly tau columns, and for a random order it is a uniformly random
tau-subset; columns are symmetric (pos_r, off_c mod out). Rows are not independent draws: all windows of
one order, so two rows overlap by max(0, tau - cyclic offset distance) (tau^2 / in on average, as for
independent subsets) and share their subset when their offsets agree (probability 1 / in). Every backend
reads the same four int32 vectors, made by the same torch code from unique sort keys, so the subsets are
identical on every device, rank and resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .metric_registry import SUM_FLOOR, metric_spec

MASK32 = 0xFFFFFFFF
# Multipliers below 2**31 (and odd, so that mix32 is a bijection): a 32-bit value times one of them
# fits in int64 without overflow, on Python ints and torch tensors alike.
_M1 = 0x21F0AAAD
_M2 = 0x735A2D97
_GOLDEN = 0x9E3779B9


# --------------------------------------------------------------------------------------------------
# Keyed hashing and the stochria subsets
# --------------------------------------------------------------------------------------------------
def mix32(x: torch.Tensor | int) -> torch.Tensor | int:
    """A 32-bit integer hash (xorshift-multiply). Works on Python ints and int64 tensors alike.

    A bijection of [0, 2^32): each step (xorshift, product with an odd multiplier mod 2^32) is one."""
    x = x ^ (x >> 16)
    x = (x * _M1) & MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & MASK32
    x = x ^ (x >> 15)
    return x


def derive_key(*parts: int) -> int:
    """Fold a tuple of non-negative integers (seed, matrix id, step, axis...) into one 32-bit key."""
    key = 0x6A09E667
    for part in parts:
        part = int(part)
        if part < 0:
            raise ValueError(f"key parts must be non-negative, got {part}")
        while True:  # fold arbitrarily large ints 32 bits at a time
            key = mix32(key ^ mix32((part & MASK32) ^ _GOLDEN))
            part >>= 32
            if part == 0:
                break
    return key


# The roles of the four keyed vectors of one matrix and step (the last part of their derived keys).
_ORDER, _OFFSET = 0, 1


def _index_hash(key: int, count: int, device: torch.device) -> torch.Tensor:
    """(count,) int64 32-bit hashes of the indices 0..count-1 under `key`: a bijection of the index
    (mix32 is one), so distinct indices get distinct hashes."""
    idx = torch.arange(count, dtype=torch.int64, device=device)
    return mix32(mix32(idx ^ key) ^ _GOLDEN)


def _keyed_positions(key: int, count: int, device: torch.device) -> torch.Tensor:
    """pos[j] = the rank of j when 0..count-1 are sorted by hash(j) * 2^31 + j. The sort keys are
    unique, so every correct sort (stable or not, any device) yields the same permutation. (A shift
    by 31, not 32: the keys stay below 2^63, no signed overflow; count < 2^31 keeps j in the low bits.)"""
    idx = torch.arange(count, dtype=torch.int64, device=device)
    sort_key = (_index_hash(key, count, device) << 31) | idx
    pos = torch.empty_like(idx)
    pos[sort_key.argsort()] = idx
    return pos.to(torch.int32)


def subset_vectors(
    base_key: int, rows: int, cols: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stochria subsets of one matrix (rows, cols) and step, as four int32 vectors
    (pos_r (rows,), off_r (rows,), pos_c (cols,), off_c (cols,)):

        row i's subset    = { j : (pos_c[j] - off_r[i]) mod cols < tau }
        column j's subset = { i : (pos_r[i] - off_c[j]) mod rows < tau }

    pos_c is a keyed order of the columns, off_r[i] a keyed offset in [0, cols): row i takes the tau
    consecutive (cyclically) columns of that order from off_r[i] on; symmetrically for the columns.
    The only code that makes subsets: every backend reads these vectors, so all see the same ones.
    """
    pos_c = _keyed_positions(derive_key(base_key, 0, _ORDER), cols, device)
    off_r = (_index_hash(derive_key(base_key, 0, _OFFSET), rows, device) % cols).to(torch.int32)
    pos_r = _keyed_positions(derive_key(base_key, 1, _ORDER), rows, device)
    off_c = (_index_hash(derive_key(base_key, 1, _OFFSET), cols, device) % rows).to(torch.int32)
    return pos_r, off_r, pos_c, off_c


# Gathered elements per chunk: on a CPU, index temporaries that stay in cache are faster; on a GPU,
# every chunk costs kernel launches, so the work goes in one piece.
_CHUNK = {"cpu": 1 << 16}
_CHUNK_DEFAULT = 1 << 26


def _window_sums(a: torch.Tensor, pos: torch.Tensor, off: torch.Tensor, tau: int) -> torch.Tensor:
    """(n,) float64: sum_t a[i, order[(off[i] + t) mod m]] for t < tau, a (n, m), order = pos^-1."""
    m = a.shape[1]
    order = torch.empty(m + tau, dtype=torch.int64, device=a.device)
    order[pos.to(torch.int64)] = torch.arange(m, dtype=torch.int64, device=a.device)
    order[m:] = order[:tau]  # the cyclic wrap, so that window k is order[k:k + tau]
    windows = order.unfold(0, tau, 1)  # (m + 1, tau) view: windows[k] = members of offset k
    off = off.to(torch.int64)
    per_chunk = max(1, _CHUNK.get(a.device.type, _CHUNK_DEFAULT) // tau)
    parts = [
        a[i0:i0 + per_chunk].gather(1, windows[off[i0:i0 + per_chunk]]).sum(dim=1, dtype=torch.float64)
        for i0 in range(0, a.shape[0], per_chunk)
    ]
    return torch.cat(parts)


def stochastic_subset_sums(
    weight_abs: torch.Tensor, base_key: int, tau: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column sums of |W| over the keyed subsets of exactly `tau` entries (float64).

    Row i's members are order_c[(off_r[i] + t) mod cols], t < tau (order_c the inverse of pos_c of
    `subset_vectors`): gathers, (rows + cols) * tau work, no data-dependent loop."""
    rows, cols = weight_abs.shape
    if not 1 <= tau <= min(rows, cols):
        raise ValueError(f"tau must be in [1, {min(rows, cols)}] for a {rows}x{cols} matrix, got {tau}")
    pos_r, off_r, pos_c, off_c = subset_vectors(base_key, rows, cols, weight_abs.device)
    row_sums = _window_sums(weight_abs, pos_c, off_r, tau)
    col_sums = _window_sums(weight_abs.t(), pos_r, off_c, tau)
    return row_sums, col_sums


# --------------------------------------------------------------------------------------------------
# The per-step small vectors
# --------------------------------------------------------------------------------------------------
class StepVectors(NamedTuple):
    """The float32 vectors of one step: S = |W| * col_scale (row_inv, col_inv None: no normaliser) or
    S = (|W| * (row_inv + col_inv)) * col_scale, normalised to mean 1 (see reference.step_vectors)."""

    row_inv: torch.Tensor | None
    col_inv: torch.Tensor | None
    col_scale: torch.Tensor


class Candidates(NamedTuple):
    """Entries of one matrix followed one by one (the closed form's candidates): their z (K,) float32,
    updated in place, |W| (K,) float32, row and column (K,) int32."""

    z: torch.Tensor
    a: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor


def channel_factor(act_sqsum: torch.Tensor | None, tokens: int, name: str, cols: int,
                   device: torch.device) -> torch.Tensor:
    """f_j (in,) float64 = n_j ** p, p the metric's channel exponent (metric_registry.py); 1 where p = 0."""
    spec = metric_spec(name)
    if not spec.needs_activations:
        return torch.ones(cols, dtype=torch.float64, device=device)
    if act_sqsum is None or tokens <= 0:
        raise ValueError(f"metric {name!r} needs activation statistics")
    n = act_sqsum.to(torch.float64) / tokens
    return n.pow(spec.channel_exponent)


def finish_step_vectors(
    rows: int,
    cols: int,
    factor: torch.Tensor,
    col_abs: torch.Tensor,
    row_sum: torch.Tensor | None,
    col_sum: torch.Tensor | None,
    weighted_rows: torch.Tensor | None,
) -> StepVectors:
    """From the step's sums to the float32 vectors of the elementwise update (shared by every
    backend, float64 throughout): S has mean 1 by construction of col_scale."""
    row_inv = col_inv = None
    if row_sum is None:
        total = (factor * col_abs).sum()
    else:
        row_inv64 = 1.0 / row_sum.clamp_min(SUM_FLOOR)
        col_inv64 = 1.0 / col_sum.clamp_min(SUM_FLOOR)
        # sum_ij |W_ij| (ir_i + ic_j) f_j = sum_j f_j ic_j colabs_j + ir . (|W| f)
        total = (factor * col_inv64 * col_abs).sum() + (row_inv64 * weighted_rows).sum()
        row_inv, col_inv = row_inv64.to(torch.float32), col_inv64.to(torch.float32)
    # kept on the device (no host sync per step): the same float64 division as on the host
    mean = total / (rows * cols)
    col_scale = torch.where(mean > 0, factor / mean, torch.zeros_like(factor)).to(torch.float32)
    return StepVectors(row_inv, col_inv, col_scale)


# --------------------------------------------------------------------------------------------------
# The mirror step's selection hint
# --------------------------------------------------------------------------------------------------
def _signed_key(value: float) -> int:
    """The order-preserving signed 32-bit key of a float32 value (as rank_keys uses)."""
    bits = int(torch.tensor([value], dtype=torch.float32).view(torch.int32).item())
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


_HINT_MIN_HALF = 1 << 14  # +-2^14 ulps: about +-0.2% around the predicted threshold at the least


def threshold_hint(new: float, old: float) -> int:
    """Where to look for the next step's threshold: linear extrapolation of the last change of the
    threshold's key (about log-linear), with a window of half that change plus a margin. Encoded as
    center << 32 | half width (keys of z >= 0 are >= 0); shared by every backend."""
    k1 = _signed_key(new)
    delta = k1 - _signed_key(old) if old > 0 else 1 << 23  # no previous threshold: guess a doubling
    center = min(max(k1 + delta, 0), (1 << 31) - 1)
    half = min(abs(delta) // 2 + _HINT_MIN_HALF, (1 << 32) - 1)
    return (center << 32) | half


# --------------------------------------------------------------------------------------------------
# Selections both backends run in torch
# --------------------------------------------------------------------------------------------------
def keep_top(keys: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Keep the k largest keys along `dim`: the k-th largest by kthvalue, ties at it to the lowest indices."""
    n = keys.shape[dim]
    if k <= 0:
        return torch.zeros_like(keys, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(keys, dtype=torch.bool)
    kth = keys.kthvalue(n - k + 1, dim=dim, keepdim=True).values
    above = keys > kth
    need = k - above.sum(dim=dim, keepdim=True)
    tie = keys == kth
    # ties at the boundary go to the lowest indices, so the count is exact and the order total
    return above | (tie & (tie.cumsum(dim=dim) <= need))


def topk_mask(keys: torch.Tensor, k: int) -> torch.Tensor:
    """bool mask (same shape) keeping the k largest keys of the whole tensor, ties to lower index (the torch
    backend's; the Triton backend runs a sample-select kernel)."""
    return keep_top(keys.reshape(-1), k, 0).reshape(keys.shape)


def row_topk_mask(keys: torch.Tensor, k: int) -> torch.Tensor:
    """keys: (out, in). Keep the k largest of every row, ties to lower column index (both backends: torch's
    row-wise kthvalue runs one block per row, already bandwidth-efficient on a GPU)."""
    return keep_top(keys, k, 1)


_KEY_OFFSET = 1 << 62  # rank keys lie in [-2^62, 2^62): shift them to [0, 2^63)
_KEY_BITS = 63
_DIGIT_BITS = 16  # 4 passes over the keys (which may be recomputed from disk for every pass)


def _digit_counts(keys: torch.Tensor, prefix: int, prefix_shift: int, digit_shift: int) -> torch.Tensor:
    """Counts (2^_DIGIT_BITS,) int64 on the CPU of the digit at `digit_shift` of the shifted rank keys
    whose bits above `prefix_shift` equal `prefix` (prefix_shift >= 63: every key)."""
    u = keys.reshape(-1) + _KEY_OFFSET
    if prefix_shift < _KEY_BITS:
        u = u[(u >> prefix_shift) == prefix]
    digits = (u >> digit_shift) & ((1 << _DIGIT_BITS) - 1)
    return torch.bincount(digits, minlength=1 << _DIGIT_BITS).cpu()


def global_keep_counts(
    keys: Sequence[torch.Tensor], total_keep: int, lower: list[int], upper: list[int]
) -> list[int]:
    """Per-matrix kept counts for one global threshold with per-matrix bounds (water-filling).

    keys: rank keys of each matrix, in the tie-break order of matrices (name order); any sequence, read
    once per pass, one matrix at a time (it may compute them on access). Matrix i keeps
    clamp(#entries above the global cut, lower[i], upper[i]); the cut runs through the total order
    (key desc, matrix order, index asc) so that the counts sum to exactly `total_keep`. Found by radix
    select on the key bits (16 bits a pass, per-matrix histograms on the keys' device): no sort, no
    concatenation.
    """
    lo = torch.tensor(lower, dtype=torch.int64)
    hi = torch.tensor(upper, dtype=torch.int64)
    if bool((lo > hi).any()) or not int(lo.sum()) <= total_keep <= int(hi.sum()):
        raise ValueError(
            f"infeasible bounds: the kept total {total_keep} must lie in [{int(lo.sum())}, {int(hi.sum())}]"
        )
    if total_keep == int(lo.sum()):
        return [int(v) for v in lo]
    if total_keep == int(hi.sum()):
        return [int(v) for v in hi]

    def clamped_total(counts: torch.Tensor) -> torch.Tensor:  # counts: (..., matrices)
        return torch.minimum(torch.maximum(counts, lo), hi).sum(dim=-1)

    above = torch.zeros(len(keys), dtype=torch.int64)  # entries strictly above the current prefix
    prefix = 0
    digit_bits = _DIGIT_BITS
    passes = -(-_KEY_BITS // digit_bits)
    for p in range(passes):
        digit_shift = (passes - 1 - p) * digit_bits
        hist = torch.stack([_digit_counts(keys[i], prefix, digit_shift + digit_bits, digit_shift)
                            for i in range(len(keys))])
        # counts from bucket b upwards (inclusive) and above b (exclusive), for every b at once
        from_b = above[:, None] + hist.flip(1).cumsum(1).flip(1)  # (matrices, buckets)
        above_b = from_b - hist
        reach = clamped_total(from_b.T) >= total_keep  # (buckets,) monotone: true for low buckets
        bucket = int(reach.nonzero().max())
        above = above_b[:, bucket]
        prefix = (prefix << digit_bits) | bucket
    ties = from_b[:, bucket] - above_b[:, bucket]
    counts = torch.minimum(torch.maximum(above, lo), hi)
    remaining = total_keep - int(counts.sum())
    for i in range(len(keys)):  # walk the tied entries in matrix order, then index order
        if remaining == 0:
            break
        grown = int(min(max(int(above[i] + ties[i]), lower[i]), upper[i]))
        take = min(remaining, grown - int(counts[i]))
        counts[i] += take
        remaining -= take
    return [int(v) for v in counts]


# --------------------------------------------------------------------------------------------------
# Around the OBS sweep
# --------------------------------------------------------------------------------------------------
def obs_inverse_factor(h: torch.Tensor, damp: float) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(U, dead): U the upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, or None when a
    factorisation fails (the caller retries with more dampening); dead: inputs with H_ii == 0, whose
    diagonal is set to 1 first (their weight columns are to be zeroed)."""
    h = h.to(torch.float32).clone()
    diag = h.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    diag += damp * diag.mean()
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        return None, dead
    u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if int(info) != 0 or not bool(torch.isfinite(u).all()):
        return None, dead
    return u, dead


def prune_block(w: torch.Tensor, keep: torch.Tensor, d: torch.Tensor, prune_count: int, prior: torch.Tensor | None,
                block: tuple[int, int]) -> None:
    """SparseGPT's unstructured rule for the columns i1 <= j < i2 of the sweep (`block`), from the weights as
    the sweep reaches them: of `prune_count` entries in all, the block's share (in proportion to its columns)
    with the smallest w^2 / U_jj^2 (times `prior`), ties to the lower flat index, set False in `keep`."""
    i1, i2 = block
    cols = w.shape[1]
    count = prune_count * i2 // cols - prune_count * i1 // cols
    score = w[:, i1:i2].square() / d[i1:i2].square()
    flat = (score if prior is None else score * prior[:, i1:i2]).reshape(-1).sort(stable=True).indices[:count]
    keep[:, i1:i2][flat // (i2 - i1), flat % (i2 - i1)] = False


def check_refine_args(keep: torch.Tensor, r: torch.Tensor, w: torch.Tensor, gram: torch.Tensor, iters: int) -> None:
    """The swap refinement's argument checks (kernels/refine.py and its twin alike)."""
    rows, cols = w.shape
    if w.dtype != torch.float32 or r.dtype != torch.float32 or gram.dtype != torch.float32:
        raise ValueError(f"w, r and gram must be float32, got {w.dtype}, {r.dtype}, {gram.dtype}")
    if keep.dtype != torch.bool or keep.shape != w.shape or r.shape != w.shape or gram.shape != (cols, cols):
        raise ValueError(f"need keep (bool) and r shaped like w {tuple(w.shape)} and gram ({cols}, {cols}), got "
                         f"{keep.dtype} {tuple(keep.shape)}, {tuple(r.shape)}, {tuple(gram.shape)}")
    if not (isinstance(iters, int) and iters >= 0):
        raise ValueError(f"iters must be a non-negative integer, got {iters!r}")

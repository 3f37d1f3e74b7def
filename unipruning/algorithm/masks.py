"""Keep masks from a saliency (docs/method.md, "Masks"), their budgets, and applying them with +0.0.

Ranking, per matrix: z, then |W|, then the flat index (`ops.rank_keys`: a total order, so counts are
exact under ties). Budgets: `layer` keeps round((1-s) * numel) per matrix, `row` round((1-s) * in) per
output row, `global` one threshold over all matrices (ties across matrices by name order) with
per-matrix sparsity bounds met by water-filling, `owl` OWL's per-block sparsity s_b per matrix (the total
exact), `owl-row` round((1-s_b) * in) per output row; N:M keeps the N best of every M consecutive inputs of
a row. Counts use the decimal the user wrote (0.7 is 7/10, not its binary rounding).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from fractions import Fraction

import torch

from .. import ops
from ..config import MaskSpec
from ..errors import UsageError
from ..lazy import LazyMapping

# rank keys kept in memory between the passes of the global selection: a small model computes them
# once, a 70B model re-reads z and W for every pass instead of holding 8 bytes per weight
KEY_CACHE_BYTES = 4 << 30


def exact_fraction(value: float) -> Fraction:
    """A float as the decimal the user wrote (0.7 -> 7/10), so counts do not depend on binary rounding."""
    return Fraction(repr(float(value)))


def keep_count(sparsity: float, numel: int) -> int:
    """round((1 - s) * numel), exact decimal arithmetic, halves to even."""
    return round((1 - exact_fraction(sparsity)) * numel)


def floor_count(fraction: float, numel: int) -> int:
    return math.floor(exact_fraction(fraction) * numel)


def check_weight(option: str, name: str, weight) -> None:
    """A weight a mask is cut from or applied to: a floating-point matrix that holds data (not the meta
    device, not integer-quantized); `option` is the argument that supplied it."""
    if not isinstance(weight, torch.Tensor):
        raise UsageError(f"`{option}`: {name} is a {type(weight).__name__}, expected a tensor")
    if weight.is_meta:
        raise UsageError(f"`{option}`: {name} is on the meta device (no data): load the weights first")
    if not weight.is_floating_point():
        raise UsageError(f"`{option}`: {name} is {weight.dtype}, expected floating point (masks are cut from and "
                         "applied to floating-point tensors: dequantize it first)")
    if weight.dim() != 2:
        raise UsageError(f"`{option}`: {name} has shape {tuple(weight.shape)}, expected a matrix (out, in)")


def check_saliency(name: str, z) -> torch.Tensor:
    """z of one matrix, refused in one line unless it is a finite floating-point tensor with data: a NaN or
    int8 z would rank nothing, and the masks would silently fall back to |W| (the ranking's second key)."""
    check_weight("z", name, z)
    if not bool(torch.isfinite(z).all()):
        bad = int((~torch.isfinite(z)).sum())
        raise UsageError(f"the saliency z of {name} has {bad} non-finite values (NaN or Inf): calibration diverged "
                         "(a smaller `kappa`, or `dtype` float32) or its file is damaged; no mask is cut from it")
    return z


def checked_saliency(z: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """z as a mapping whose every lookup is checked (`check_saliency`); read as lazily as z itself."""
    if not isinstance(z, Mapping):
        raise UsageError(f"`z`: expected {{matrix name: saliency tensor}}, got {type(z).__name__}")
    return LazyMapping(list(z), lambda name: check_saliency(name, z[name]))


def _check_pair(name: str, z: torch.Tensor, weight) -> None:
    check_weight("weights", name, weight)
    if tuple(z.shape) != tuple(weight.shape):
        raise UsageError(f"`z`: {name} has shape {tuple(z.shape)}, but its weight is {tuple(weight.shape)}")


def check_masks(weights: Mapping[str, torch.Tensor], masks) -> None:
    """Every mask fits its weight, all checked before any weight is touched (masks are applied in place):
    named matrices the model has, bool tensors of the weight's shape, weights with data."""
    if not isinstance(masks, Mapping):
        raise UsageError(f"`masks`: expected {{matrix name: bool keep mask}}, got {type(masks).__name__}")
    missing = [n for n in masks if n not in weights]
    if missing:
        raise UsageError(f"`masks` name matrices the model does not have: {missing[:3]}")
    for name, keep in masks.items():
        check_weight("model", name, weights[name])
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.is_meta:
            got = f"{keep.dtype} on {keep.device}" if isinstance(keep, torch.Tensor) else type(keep).__name__
            raise UsageError(f"`masks`: {name} is {got}, expected a bool tensor with data (True = keep)")
        if tuple(keep.shape) != tuple(weights[name].shape):
            raise UsageError(f"`masks`: {name} has shape {tuple(keep.shape)}, but its weight is "
                             f"{tuple(weights[name].shape)}")


def check_nm_divisible(shapes: Mapping[str, tuple[int, ...]], m: int) -> None:
    for name, shape in shapes.items():
        if shape[-1] % m:
            raise UsageError(f"{name}: in_features {shape[-1]} is not divisible by M={m}, so it cannot be pruned N:{m}")


def check_plan(shapes: Mapping[str, tuple[int, ...]], plan: Mapping[str, MaskSpec]) -> None:
    """Every matrix planned N:M has in_features divisible by M."""
    for name, spec in plan.items():
        if spec.nm is not None:
            check_nm_divisible({name: shapes[name]}, spec.nm[1])


def global_counts(z: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor], names: list[str],
                  spec: MaskSpec, backend: str | None, device: torch.device | None = None,
                  numels: Mapping[str, int] | None = None) -> dict[str, int]:
    """Kept count per matrix under the global budget with bounds, over `names` (tie-broken in sorted
    order). z and weights may be lazy mappings (read on access, one matrix in memory); `numels` saves
    reading the weights for their sizes."""
    names = sorted(names)

    def keys_of(i: int) -> torch.Tensor:
        weight, zi = weights[names[i]], z[names[i]]
        _check_pair(names[i], zi, weight)
        on = device if device is not None else weight.device
        return ops.rank_keys(zi.to(on), weight.to(on), backend=backend)

    keys = LazyMapping(range(len(names)), keys_of, KEY_CACHE_BYTES)
    sizes = [numels[n] if numels is not None else weights[n].numel() for n in names]
    s_min, s_max = spec.bounds
    total = keep_count(spec.sparsity, sum(sizes))
    lower = [keep_count(s_max, n) for n in sizes]
    upper = [keep_count(s_min, n) for n in sizes]
    try:
        counts = ops.global_keep_counts(keys, total, lower, upper, backend=backend)
    except ValueError as exc:
        raise UsageError(f"`allocation` global: {exc} (`bounds` {spec.bounds})") from exc
    return dict(zip(names, counts, strict=True))


_BLOCK = re.compile(r"\.(\d+)\.")


def block_of(name: str) -> int:
    """The decoder block of a matrix name (the first .N. in it: model.layers.N.*)."""
    return int(_BLOCK.search(name).group(1))


def owl_block_sparsities(z: Mapping[str, torch.Tensor], names: list[str], spec: MaskSpec) -> dict[int, float]:
    """OWL's per-block sparsity (Yin et al. 2024) from the saliency: D_b, the fraction of block b's
    entries whose z exceeds owl_m times the block's mean z, is scaled to [0, 2 lambda] as OWL does; s_b =
    s - (that - its mean weighted by block size), shrunk toward s where needed to stay within +-lambda, so
    blocks with more outliers keep more and the size-weighted mean is exactly s. Reads each z twice (the
    block means first), one matrix at a time."""
    totals: dict[int, list[float]] = {}
    for name in names:
        zb = z[name]
        entry = totals.setdefault(block_of(name), [0.0, 0, 0])
        entry[0] += float(zb.sum(dtype=torch.float64))
        entry[1] += zb.numel()
    for name in names:
        b = block_of(name)
        totals[b][2] += int((z[name] > spec.owl_m * totals[b][0] / totals[b][1]).sum())
    ratio = {b: outliers / numel for b, (_, numel, outliers) in totals.items()}
    lo, hi = min(ratio.values()), max(ratio.values())
    scaled = {b: 0.0 if hi == lo else 2 * spec.owl_lambda * (r - lo) / (hi - lo) for b, r in ratio.items()}
    size = sum(numel for _, numel, _ in totals.values())
    mean = sum(scaled[b] * totals[b][1] for b in scaled) / size
    offset = {b: scaled[b] - mean for b in scaled}
    # centring an uneven spread can take a block beyond lambda: shrink toward the target, mean still 0
    shrink = min(1.0, spec.owl_lambda / max(max(abs(d) for d in offset.values()), 1e-300))
    return {b: spec.sparsity - offset[b] * shrink for b in sorted(offset)}


def owl_counts(z: Mapping[str, torch.Tensor], numels: Mapping[str, int], names: list[str],
               spec: MaskSpec) -> tuple[dict[str, int], dict[int, float]]:
    """Kept count per matrix under OWL's block sparsities, the total exactly keep_count(s, all entries)
    (largest remainders get the rounding); and the block sparsities."""
    sparsities = owl_block_sparsities(z, names, spec)
    wanted = {n: (1 - Fraction(sparsities[block_of(n)])) * numels[n] for n in names}
    counts = {n: math.floor(w) for n, w in wanted.items()}
    missing = keep_count(spec.sparsity, sum(numels[n] for n in names)) - sum(counts.values())
    order = sorted(names, key=lambda n: (counts[n] - wanted[n], n))  # largest remainder first
    for n in order[:missing] if missing > 0 else order[::-1][:-missing]:
        counts[n] += 1 if missing > 0 else -1
    return counts, sparsities


def matrix_mask(z: torch.Tensor, weight: torch.Tensor, spec: MaskSpec, count: int | None = None,
                backend: str | None = None) -> torch.Tensor:
    """The keep mask of one matrix (bool, same shape as W). `count`: kept total under `global` / `owl`,
    kept per row under `owl-row`."""
    keys = ops.rank_keys(z.to(weight.device), weight, backend=backend)
    nm = spec.nm
    if nm is not None:
        return ops.nm_mask(keys, nm[0], nm[1], backend=backend)
    if spec.allocation == "row":
        return ops.row_topk_mask(keys, keep_count(spec.sparsity, weight.shape[1]), backend=backend)
    if spec.cross_block:
        if count is None:
            raise ValueError(f"allocation {spec.allocation!r} needs the per-matrix count (MaskCutter)")
        if spec.per_row:
            return ops.row_topk_mask(keys, count, backend=backend)
        return ops.topk_mask(keys, count, backend=backend)
    return ops.topk_mask(keys, keep_count(spec.sparsity, weight.numel()), backend=backend)


class MaskCutter:
    """cut(name, weight) -> the keep mask (on `device`, or the weight's) of a planned matrix from its z,
    under its planned MaskSpec. With allocation global or owl the per-matrix counts are settled once, over
    every planned matrix (`weights` then supplies them, lazily if it likes, with `numels` their sizes);
    `block_sparsities` holds owl's (and owl-row's) per-block sparsities."""

    def __init__(self, z: Mapping[str, torch.Tensor], plan: Mapping[str, MaskSpec], spec: MaskSpec,
                 backend: str | None, device: torch.device | None = None,
                 weights: Mapping[str, torch.Tensor] | None = None, numels: Mapping[str, int] | None = None):
        z = checked_saliency(z)
        self.z, self.plan, self.backend, self.device = z, plan, backend, device
        self.counts, self.block_sparsities = {}, None
        if spec.allocation == "global":
            self.counts = global_counts(z, weights, list(plan), spec, backend, device, numels)
        elif spec.allocation == "owl":
            numels = numels if numels is not None else {n: weights[n].numel() for n in plan}
            self.counts, self.block_sparsities = owl_counts(z, numels, list(plan), spec)
        elif spec.allocation == "owl-row":
            self.block_sparsities = owl_block_sparsities(z, list(plan), spec)

    def __call__(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        on, spec = self.device if self.device is not None else weight.device, self.plan[name]
        if spec.allocation == "owl-row":  # per row, from the block's sparsity
            count = keep_count(self.block_sparsities[block_of(name)], weight.shape[1])
        else:
            count = self.counts.get(name)
        z = self.z[name]
        _check_pair(name, z, weight)
        return matrix_mask(z.to(on), weight.to(on), spec, count, self.backend)


def iter_masks(z: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor], spec: MaskSpec,
               backend: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, keep mask) of every matrix of z under one spec, in z's order; one mask in memory at a time."""
    if not isinstance(spec, MaskSpec):
        raise UsageError(f"`spec`: expected a MaskSpec, got {type(spec).__name__} {spec!r:.100}")
    if not isinstance(z, Mapping) or not isinstance(weights, Mapping):
        raise UsageError("`z` and `weights`: expected mappings {matrix name: tensor}")
    missing = [n for n in z if n not in weights]
    if missing:
        raise UsageError(f"`weights` lacks {missing[0]!r}, which z names (pass every matrix z has a saliency of)")
    if spec.nm is not None:
        for n in z:
            check_weight("weights", n, weights[n])
        check_nm_divisible({n: tuple(weights[n].shape) for n in z}, spec.nm[1])
    cut = MaskCutter(z, dict.fromkeys(z, spec), spec, backend, weights=weights)
    for name in z:
        yield name, cut(name, weights[name])


def compute_masks(z: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor], spec: MaskSpec,
                  backend: str | None = None) -> dict[str, torch.Tensor]:
    """{name: keep mask} of every matrix of z (a saliency's z, or a Saliency) under one spec."""
    z = getattr(z, "z", z)
    return dict(iter_masks(z, weights, spec, backend))


def masked(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """W with the dropped entries set to +0.0 (never -0.0: some sparse kernels and compressors break)."""
    return weight.masked_fill(~keep.to(weight.device), 0) + 0.0


def nm_valid(keep: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of m consecutive entries of a row keeps at most n."""
    rows, cols = keep.shape
    if cols % m:
        return False
    return bool((keep.reshape(rows, cols // m, m).sum(-1) <= n).all())


def mask_stats(keep: torch.Tensor, nm: tuple[int, int] | None) -> dict:
    """What the report says of one matrix's mask."""
    kept = int(keep.sum())
    return {
        "shape": list(keep.shape),
        "numel": keep.numel(),
        "kept": kept,
        "sparsity": 1 - kept / keep.numel(),
        "nm_valid": nm_valid(keep, *nm) if nm else None,
    }

"""Gamma -> keep masks (SPEC section 5), and applying them with positive zeros.

Ranking, per matrix: z, then |W|, then the flat index (kernels/reference.py `rank_keys`). Budgets:
`layer` keeps round((1-s) * numel) per matrix, `row` round((1-s) * in) per output row, `global` one
threshold over all matrices (ties across matrices by parameter name order) with per-matrix sparsity
bounds met by water-filling; N:M keeps the N best of every M consecutive inputs of a row.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from . import ops
from .config import MaskSpec, keep_count
from .models import check_nm_divisible, model_matrices, weight_of


class _KeySource(Sequence):
    """The rank keys of each matrix, computed when asked for (z and W read then, one matrix in memory),
    kept while they fit in `cache_bytes`: the global selection reads every matrix's keys once per pass,
    so a small model computes them once and a 70B model re-reads z and W instead of holding 8 bytes per
    weight."""

    def __init__(self, names, z, weights, device, backend, cache_bytes: int):
        self.names, self.z, self.weights, self.device, self.backend = names, z, weights, device, backend
        self.cache: dict[int, torch.Tensor] = {}
        self.free = cache_bytes

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> torch.Tensor:
        if i in self.cache:
            return self.cache[i]
        name = self.names[i]
        weight = self.weights[name]
        device = self.device if self.device is not None else weight.device
        keys = ops.rank_keys(self.z[name].to(device), weight.to(device), backend=self.backend)
        if keys.numel() * keys.element_size() <= self.free:
            self.cache[i] = keys
            self.free -= keys.numel() * keys.element_size()
        return keys


KEY_CACHE_BYTES = 4 << 30


def global_counts(
    saliency, weights: Mapping[str, torch.Tensor], spec: MaskSpec, backend: str | None = None,
    numels: Mapping[str, int] | None = None, device: torch.device | None = None, names: list[str] | None = None,
) -> dict[str, int]:
    """Kept count per matrix under the global budget with bounds (names tie-broken in sorted order), over
    `names` (default: every matrix of the saliency). `weights` may be a lazy mapping (read on access);
    `numels` saves reading them for their sizes."""
    names = sorted(saliency.z if names is None else names)
    keys = _KeySource(names, saliency.z, weights, device, backend, KEY_CACHE_BYTES)
    sizes = [numels[n] if numels is not None else weights[n].numel() for n in names]
    s_min, s_max = spec.bounds
    total = keep_count(spec.sparsity, sum(sizes))
    lower = [keep_count(s_max, n) for n in sizes]
    upper = [keep_count(s_min, n) for n in sizes]
    try:
        counts = ops.global_keep_counts(keys, total, lower, upper, backend=backend)
    except ValueError as exc:
        from .errors import UsageError

        raise UsageError(f"--allocation global: {exc} (bounds {spec.bounds})") from exc
    return dict(zip(names, counts, strict=True))


def matrix_mask(
    z: torch.Tensor,
    weight: torch.Tensor,
    spec: MaskSpec,
    count: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """The keep mask of one matrix (bool, same shape as W). `count`: kept total under `global`."""
    keys = ops.rank_keys(z.to(weight.device), weight, backend=backend)
    nm = spec.nm
    if nm is not None:
        return ops.nm_mask(keys, nm[0], nm[1], backend=backend)
    if spec.allocation == "row":
        return ops.row_topk_mask(keys, keep_count(spec.sparsity, weight.shape[1]), backend=backend)
    if spec.allocation == "global":
        if count is None:
            raise ValueError("allocation 'global' needs the per-matrix count from global_counts()")
        return ops.topk_mask(keys, count, backend=backend)
    return ops.topk_mask(keys, keep_count(spec.sparsity, weight.numel()), backend=backend)


def iter_masks(
    saliency, weights: dict[str, torch.Tensor], spec: MaskSpec, backend: str | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, keep mask) per matrix, in the saliency's order; one mask in memory at a time."""
    if spec.nm is not None:
        check_nm_divisible({n: tuple(weights[n].shape) for n in saliency.z}, spec.nm[1])
    counts = global_counts(saliency, weights, spec, backend) if spec.allocation == "global" else {}
    for name, z in saliency.z.items():
        yield name, matrix_mask(z, weights[name], spec, counts.get(name), backend)


def compute_masks(saliency, weights: dict[str, torch.Tensor], spec: MaskSpec, backend: str | None = None):
    return dict(iter_masks(saliency, weights, spec, backend))


def masked(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """W with the dropped entries set to +0.0 (never -0.0: some sparse kernels and compressors break)."""
    return weight.masked_fill(~keep.to(weight.device), 0) + 0.0


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the dropped entries of the model's prunable matrices in place (+0.0 zeros). Keys are the
    matrices' logical names (models.Matrix: parameter names, with [part]/[expert] for fused and MoE)."""
    views = {m.name: weight_of(model, m) for m in model_matrices(model)}
    missing = [n for n in masks if n not in views]
    if missing:
        raise KeyError(f"masks name matrices the model does not have: {missing[:3]}")
    for name, keep in masks.items():
        if tuple(keep.shape) != tuple(views[name].shape):
            raise ValueError(f"{name}: mask shape {tuple(keep.shape)} != weight shape {tuple(views[name].shape)}")
        views[name].copy_(masked(views[name], keep))


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


def nm_valid(keep: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of m consecutive entries of a row keeps at most n."""
    rows, cols = keep.shape
    if cols % m:
        return False
    return bool((keep.reshape(rows, cols // m, m).sum(-1) <= n).all())

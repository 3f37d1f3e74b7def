"""Frozen, validated settings: what mask to cut (MaskSpec) and how to calibrate (PruneConfig)."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from fractions import Fraction

from .errors import UsageError
from .kernels.reference import METRICS as SALIENCY_METRICS

# the saliency's local scores, and SparseGPT's rule (masks chosen during the OBS sweep, no saliency)
METRICS = (*SALIENCY_METRICS, "sparsegpt")
RECONSTRUCTIONS = ("none", "obs")
ALLOCATIONS = ("layer", "row", "global")
FEEDBACKS = ("none", "full")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")
BACKENDS = ("auto", "torch", "triton", "cuda")

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N, M) with 0 < N < M. Raises UsageError otherwise."""
    if pattern is None or pattern == "unstructured":
        return None
    if isinstance(pattern, tuple):
        n, m = pattern
    else:
        match = _NM.match(str(pattern))
        if not match:
            raise UsageError(f"--pattern: expected 'unstructured' or 'N:M' (e.g. 2:4), got {pattern!r}")
        n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise UsageError(f"--pattern: N:M needs 0 < N < M (keep N of every M), got {n}:{m}")
    return n, m


def exact_fraction(value: float) -> Fraction:
    """A float as the decimal the user wrote (0.7 -> 7/10), so counts do not depend on binary rounding."""
    return Fraction(repr(float(value)))


def keep_count(sparsity: float, numel: int) -> int:
    """round((1 - s) * numel), exact decimal arithmetic, halves to even."""
    return round((1 - exact_fraction(sparsity)) * numel)


def floor_count(fraction: float, numel: int) -> int:
    return math.floor(exact_fraction(fraction) * numel)


@dataclass(frozen=True)
class MaskSpec:
    """Which mask to cut from a saliency.

    sparsity: fraction of entries removed, in (0, 1). With an N:M pattern it is implied (1 - N/M) and
    may be left None. allocation: 'layer' (per matrix), 'row' (per output row) or 'global' (one
    threshold over all matrices, each matrix's sparsity within `bounds`).
    """

    sparsity: float | None = None
    pattern: str = "unstructured"
    allocation: str = "layer"
    bounds: tuple[float, float] = (0.0, 0.99)

    def __post_init__(self) -> None:
        nm = parse_pattern(self.pattern)
        pattern = "unstructured" if nm is None else f"{nm[0]}:{nm[1]}"
        object.__setattr__(self, "pattern", pattern)
        if nm is not None:
            implied = 1 - nm[0] / nm[1]
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise UsageError(
                    f"--sparsity {self.sparsity} contradicts --pattern {pattern}, which implies {implied:g}"
                )
            object.__setattr__(self, "sparsity", implied)
        sparsity = 0.5 if self.sparsity is None else self.sparsity
        if not isinstance(sparsity, (int, float)) or not 0 < sparsity < 1:
            raise UsageError(f"--sparsity: expected a number in (0, 1), got {self.sparsity!r}")
        object.__setattr__(self, "sparsity", float(sparsity))
        if self.allocation not in ALLOCATIONS:
            raise UsageError(f"--allocation: expected one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if nm is not None and self.allocation != "layer":
            raise UsageError(f"--allocation {self.allocation} cannot be combined with an N:M pattern")
        lo, hi = self.bounds
        if not 0 <= lo <= hi < 1:
            raise UsageError(f"bounds: expected 0 <= s_min <= s_max < 1, got {self.bounds}")
        object.__setattr__(self, "bounds", (float(lo), float(hi)))

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)


@dataclass(frozen=True)
class PruneConfig:
    """Calibration settings (SPEC section 4) plus the mask to cut at the end.

    metric: local score S (or 'sparsegpt': SparseGPT's own masks, no saliency); kappa: mirror step
    size; lam: fraction of entries below the threshold t; batch_size: windows per mirror step (and per
    forward of the reconstruction); seed: calibration windows and stochria subsets; reconstruct: 'obs'
    updates the kept weights after masking (SPEC section 9).
    """

    mask: MaskSpec = field(default_factory=MaskSpec)
    metric: str = "stochria"
    kappa: float = 0.01
    lam: float = 0.001
    batch_size: int = 1
    seed: int = 0
    feedback: str = "none"
    reconstruct: str = "none"
    device: str = "auto"
    dtype: str = "auto"
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise UsageError(f"--metric: expected one of {', '.join(METRICS)}, got {self.metric!r}")
        if not (isinstance(self.kappa, (int, float)) and self.kappa > 0 and math.isfinite(self.kappa)):
            raise UsageError(f"--kappa: expected a positive number, got {self.kappa!r}")
        if not (isinstance(self.lam, (int, float)) and 0 <= self.lam < 1):
            raise UsageError(f"--lam: expected a fraction in [0, 1), got {self.lam!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise UsageError(f"--batch-size: expected a positive integer, got {self.batch_size!r}")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise UsageError(f"--seed: expected a non-negative integer, got {self.seed!r}")
        if self.feedback not in FEEDBACKS:
            raise UsageError(f"--feedback: expected one of {', '.join(FEEDBACKS)}, got {self.feedback!r}")
        if self.feedback == "full" and self.metric == "sparsegpt":
            raise UsageError("--feedback full calibrates a saliency; --metric sparsegpt has none")
        if self.reconstruct not in RECONSTRUCTIONS:
            raise UsageError(f"--reconstruct: expected one of {', '.join(RECONSTRUCTIONS)}, got {self.reconstruct!r}")
        if self.metric == "sparsegpt":
            if self.reconstruct != "obs":
                raise UsageError("--metric sparsegpt chooses its masks during the OBS sweep: pass --reconstruct obs")
            if self.mask.nm is None and self.mask.allocation != "layer":
                raise UsageError(f"--metric sparsegpt: --allocation {self.mask.allocation} is not SparseGPT's rule "
                                 "(use layer, or an N:M pattern)")
        for name, value, allowed in (
            ("--device", self.device, DEVICES),
            ("--dtype", self.dtype, DTYPES),
            ("--backend", self.backend, BACKENDS),
        ):
            if value not in allowed:
                raise UsageError(f"{name}: expected one of {', '.join(allowed)}, got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)

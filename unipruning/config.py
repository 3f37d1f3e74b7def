"""Frozen, validated option objects: what mask to cut (MaskSpec), how to calibrate (PruneConfig), where the
calibration windows come from (Calibration), how a mask job computes (MaskConfig) and how a job on
directories runs (RunOptions). Bad values raise UsageError naming the parameter (errors.py)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from .errors import UsageError

# the saliency's local scores (kernels/reference.py implements them), and SparseGPT's rule (masks chosen
# during the OBS sweep, no saliency)
SALIENCY_METRICS = ("magnitude", "wanda", "ria", "stochria")
METRICS = (*SALIENCY_METRICS, "sparsegpt")
RECONSTRUCTIONS = ("none", "obs")
ALLOCATIONS = ("layer", "row", "global", "owl", "owl-row")
OWL_ALLOCATIONS = ("owl", "owl-row")
FEEDBACKS = ("none", "full")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")
BACKENDS = ("auto", "torch", "triton")
OFFLOAD_MODES = ("auto", "always", "never")
SALIENCY_UPDATES = ("auto", "closed-form", "exact")
# the OBS pass's defaults (SparseGPT's --percdamp and --blocksize; algorithm/obs.py), and the dampening
# in proportion to each input's own H_ii (algorithm/obs.py, dampen_diagonal; 0: none, SparseGPT's Hessian)
PERCDAMP, BLOCKSIZE, DIAG_DAMP = 0.01, 128, 0.0

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
            raise UsageError(f"`pattern`: expected 'unstructured' or 'N:M' (e.g. 2:4), got {pattern!r}")
        n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise UsageError(f"`pattern`: N:M needs 0 < N < M (keep N of every M), got {n}:{m}")
    return n, m


def _choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UsageError(f"`{name}`: expected one of {', '.join(allowed)}, got {value!r}")


def _positive_int(name: str, value) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise UsageError(f"`{name}`: expected a positive integer, got {value!r}")


@dataclass(frozen=True)
class MaskSpec:
    """Which mask to cut from a saliency.

    sparsity: fraction of entries removed, in (0, 1). With an N:M pattern it is implied (1 - N/M) and
    may be left None. allocation: 'layer' (per matrix), 'row' (per output row), 'global' (one
    threshold over all matrices, each matrix's sparsity within `bounds`) or 'owl' (per decoder block,
    from its outlier ratio: blocks with more entries above owl_m times the block's mean saliency keep
    more, within +-owl_lambda of `sparsity`, averaging exactly to it; OWL, Yin et al. 2024) or 'owl-row'
    (OWL's block sparsities, each output row of the block's matrices cut to its block's, as OWL cuts
    Wanda's scores; the total then differs from `sparsity`'s by the rounding of each row).
    """

    sparsity: float | None = None
    pattern: str = "unstructured"
    allocation: str = "layer"
    bounds: tuple[float, float] = (0.0, 0.99)
    owl_m: float = 5.0
    owl_lambda: float = 0.08

    def __post_init__(self) -> None:
        nm = parse_pattern(self.pattern)
        pattern = "unstructured" if nm is None else f"{nm[0]}:{nm[1]}"
        object.__setattr__(self, "pattern", pattern)
        if nm is not None:
            implied = 1 - nm[0] / nm[1]
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise UsageError(f"`sparsity` {self.sparsity} contradicts `pattern` {pattern}, which implies "
                                 f"{implied:g}")
            object.__setattr__(self, "sparsity", implied)
        sparsity = 0.5 if self.sparsity is None else self.sparsity
        if not isinstance(sparsity, (int, float)) or not 0 < sparsity < 1:
            raise UsageError(f"`sparsity`: expected a number in (0, 1), got {self.sparsity!r}")
        object.__setattr__(self, "sparsity", float(sparsity))
        _choice("allocation", self.allocation, ALLOCATIONS)
        if nm is not None and self.allocation != "layer":
            raise UsageError(f"`allocation` {self.allocation} cannot be combined with an N:M pattern")
        lo, hi = self.bounds
        if not 0 <= lo <= hi < 1:
            raise UsageError(f"`bounds`: expected 0 <= s_min <= s_max < 1, got {self.bounds}")
        object.__setattr__(self, "bounds", (float(lo), float(hi)))
        if not (isinstance(self.owl_m, (int, float)) and self.owl_m > 0):
            raise UsageError(f"`owl_m`: expected a positive number, got {self.owl_m!r}")
        if not (isinstance(self.owl_lambda, (int, float)) and 0 <= self.owl_lambda):
            raise UsageError(f"`owl_lambda`: expected a non-negative number, got {self.owl_lambda!r}")
        spread = (self.sparsity - self.owl_lambda, self.sparsity + self.owl_lambda)
        if self.allocation in OWL_ALLOCATIONS and not 0 <= spread[0] < spread[1] < 1:
            raise UsageError(f"`owl_lambda` {self.owl_lambda} takes blocks outside (0, 1) around `sparsity` "
                             f"{self.sparsity}")

    @property
    def cross_block(self) -> bool:
        """Whether a matrix's mask depends on the saliency of other blocks (global, owl, owl-row)."""
        return self.allocation == "global" or self.allocation in OWL_ALLOCATIONS

    @property
    def per_row(self) -> bool:
        """Whether every output row keeps its own count (row, owl-row)."""
        return self.allocation in ("row", "owl-row")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)


def _check_compute(device: str, dtype: str, backend: str, reconstruct: str, batch_size: int,
                   guide_alpha: float | None) -> None:
    _choice("device", device, DEVICES)
    _choice("dtype", dtype, DTYPES)
    _choice("backend", backend, BACKENDS)
    _choice("reconstruct", reconstruct, RECONSTRUCTIONS)
    _positive_int("batch_size", batch_size)
    if guide_alpha is not None:
        if not (isinstance(guide_alpha, (int, float)) and guide_alpha >= 0 and math.isfinite(guide_alpha)):
            raise UsageError(f"`guide_alpha`: expected a non-negative number, got {guide_alpha!r}")
        if reconstruct != "obs":
            raise UsageError("`guide_alpha` guides the OBS sweep's choice of pruned entries: pass `reconstruct` obs")


def check_guide(guide_alpha: float | None, spec: MaskSpec) -> None:
    if guide_alpha is not None and spec.per_row:
        raise UsageError(f"`guide_alpha`: the guided sweep chooses per matrix, not per row as `allocation` "
                         f"{spec.allocation} does (use layer, global or owl, or an N:M pattern)")


def _check_obs(percdamp, blocksize, true_sequential, diag_damp) -> None:
    if not (isinstance(percdamp, (int, float)) and not isinstance(percdamp, bool) and 0 < percdamp
            and math.isfinite(percdamp)):
        raise UsageError(f"`percdamp`: expected a positive fraction of the mean Hessian diagonal, got {percdamp!r}")
    if not (isinstance(diag_damp, (int, float)) and not isinstance(diag_damp, bool) and 0 <= diag_damp
            and math.isfinite(diag_damp)):
        raise UsageError(f"`diag_damp`: expected a non-negative fraction of each input's Hessian diagonal, got "
                         f"{diag_damp!r}")
    _positive_int("blocksize", blocksize)
    if not isinstance(true_sequential, bool):
        raise UsageError(f"`true_sequential`: expected true or false, got {true_sequential!r}")


OBS_DEFAULTS = {"percdamp": PERCDAMP, "blocksize": BLOCKSIZE, "true_sequential": True, "diag_damp": DIAG_DAMP}


def obs_settings(settings: dict) -> dict:
    """The OBS settings (OBS_DEFAULTS' keys) of `settings` as a report records them: only those that differ
    from the defaults, so that reports (and run keys) of runs with the defaults are what they were before
    the settings existed. Removes them from `settings`."""
    return {k: v for k in OBS_DEFAULTS if (v := settings.pop(k)) != OBS_DEFAULTS[k]}


@dataclass(frozen=True)
class PruneConfig:
    """Calibration settings (docs/method.md) plus the mask to cut at the end.

    metric: local score S (or 'sparsegpt': SparseGPT's own masks, no saliency); kappa: mirror step
    size; lam: fraction of entries below the threshold t; batch_size: windows per mirror step (and per
    forward of the reconstruction); seed: calibration windows and stochria subsets; reconstruct: 'obs'
    updates the kept weights after masking; guide_alpha (with reconstruct 'obs'): instead of the saliency's
    mask, let the sweep choose the pruned entries by SparseGPT's score times (saliency rank)^guide_alpha.
    saliency_update: 'exact' runs the recursion step by step over
    every entry; 'closed-form' (feedback none only) gets the same saliency from per-step vectors in one
    product per matrix (docs/method.md, "The closed form"); 'auto' is closed-form for feedback none.
    percdamp, blocksize: the OBS pass's dampening (fraction of the mean Hessian diagonal) and columns per
    lazy batch (SparseGPT's --percdamp and --blocksize); diag_damp: each input's H_ii grows by this fraction
    of itself (the Hessian shrunk toward its diagonal: a smaller update that fits the calibration text's
    input correlations less; 0 = SparseGPT's); true_sequential: each group of a block (q/k/v, o,
    gate/up, down) takes its Hessian from the block as reconstructed so far (GPTQ's --true-sequential), or,
    False, every group from the block as it came in, before any of it was pruned (llm-compressor's way).
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
    saliency_update: str = "auto"
    guide_alpha: float | None = None
    percdamp: float = PERCDAMP
    blocksize: int = BLOCKSIZE
    true_sequential: bool = True
    diag_damp: float = DIAG_DAMP

    def __post_init__(self) -> None:
        _choice("metric", self.metric, METRICS)
        _check_obs(self.percdamp, self.blocksize, self.true_sequential, self.diag_damp)
        _choice("saliency_update", self.saliency_update, SALIENCY_UPDATES)
        if not (isinstance(self.kappa, (int, float)) and self.kappa > 0 and math.isfinite(self.kappa)):
            raise UsageError(f"`kappa`: expected a positive number, got {self.kappa!r}")
        if not (isinstance(self.lam, (int, float)) and 0 <= self.lam < 1):
            raise UsageError(f"`lam`: expected a fraction in [0, 1), got {self.lam!r}")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise UsageError(f"`seed`: expected a non-negative integer, got {self.seed!r}")
        _choice("feedback", self.feedback, FEEDBACKS)
        if self.feedback == "full" and self.metric == "sparsegpt":
            raise UsageError("`feedback` full calibrates a saliency; `metric` sparsegpt has none")
        if self.feedback == "full" and self.saliency_update == "closed-form":
            raise UsageError("`saliency_update` closed-form needs frozen weights: `feedback` full moves them "
                             "(use exact or auto)")
        _check_compute(self.device, self.dtype, self.backend, self.reconstruct, self.batch_size, self.guide_alpha)
        check_guide(self.guide_alpha, self.mask)
        if self.metric == "sparsegpt" and self.guide_alpha is not None:
            raise UsageError("`guide_alpha` weighs the sweep by the saliency: `metric` sparsegpt has none")
        if self.metric == "sparsegpt":
            if self.reconstruct != "obs":
                raise UsageError("`metric` sparsegpt chooses its masks during the OBS sweep: pass `reconstruct` obs")
            if self.mask.nm is None and self.mask.allocation != "layer":
                raise UsageError(f"`metric` sparsegpt: `allocation` {self.mask.allocation} is not SparseGPT's rule "
                                 "(use layer, or an N:M pattern)")

    @property
    def has_saliency(self) -> bool:
        return self.metric != "sparsegpt"

    @property
    def closed_form(self) -> bool:
        """Whether the saliency is computed in closed form ('auto': whenever the weights are frozen)."""
        return self.saliency_update == "closed-form" or (self.saliency_update == "auto" and self.feedback == "none")

    def to_dict(self) -> dict:
        settings = asdict(self)
        obs = obs_settings(settings)  # first: it takes the OBS settings out of `settings`
        return {**settings, **obs}


@dataclass(frozen=True)
class MaskConfig:
    """How `mask_checkpoint` computes: reconstruct 'obs' runs the OBS pass (it needs a Calibration),
    batch_size windows per forward of that pass, guide_alpha, percdamp, blocksize, true_sequential and diag_damp as
    PruneConfig's, and where (device, dtype, backend)."""

    reconstruct: str = "none"
    batch_size: int = 1
    device: str = "auto"
    dtype: str = "auto"
    backend: str = "auto"
    guide_alpha: float | None = None
    percdamp: float = PERCDAMP
    blocksize: int = BLOCKSIZE
    true_sequential: bool = True
    diag_damp: float = DIAG_DAMP

    def __post_init__(self) -> None:
        _check_compute(self.device, self.dtype, self.backend, self.reconstruct, self.batch_size, self.guide_alpha)
        _check_obs(self.percdamp, self.blocksize, self.true_sequential, self.diag_damp)


@dataclass(frozen=True)
class Calibration:
    """Where calibration windows come from: `calib` (c4, wikitext2, or a .txt / directory / .jsonl path),
    nsamples windows of seqlen tokens, tokenized with the tokenizer in `tokenizer_dir` (default: the
    model's). For `mask_checkpoint`, nsamples, seqlen and seed left None take the saliency's."""

    calib: str = "c4"
    nsamples: int | None = 128
    seqlen: int | None = 2048
    tokenizer_dir: str | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.nsamples is not None:
            _positive_int("nsamples", self.nsamples)
        if self.seqlen is not None and not (isinstance(self.seqlen, int) and self.seqlen >= 2):
            raise UsageError(f"`seqlen`: expected an integer of at least 2, got {self.seqlen!r}")

    def steps(self, batch_size: int) -> int:
        """Mirror steps of `batch_size` windows: the one place that says the batch divides the windows."""
        if self.nsamples % batch_size:
            raise UsageError(f"`batch_size` {batch_size} must divide `nsamples` {self.nsamples} "
                             "(every step has one shape)")
        return self.nsamples // batch_size


@dataclass(frozen=True)
class RunOptions:
    """How a job on checkpoint directories runs: overwrite a non-empty output; where activations live
    between blocks (offload: auto, always = pinned CPU memory, never); allow a checkpoint's own
    modelling code; dry_run: plan only, write nothing; progress(done, total) per block of each pass, first
    with done 0 before the pass's first block (a progress.Progress shows bars)."""

    overwrite: bool = False
    offload: str = "auto"
    trust_remote_code: bool = False
    dry_run: bool = False
    progress: Callable[[int, int], None] | None = None

    def __post_init__(self) -> None:
        _choice("offload", self.offload, OFFLOAD_MODES)

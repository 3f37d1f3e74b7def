"""Frozen, validated option objects: what mask to cut (MaskSpec), how to calibrate (PruneConfig), where the
calibration windows come from (Calibration), how a mask job computes (MaskConfig) and how a job on
directories runs (RunOptions). Bad values raise UsageError naming the parameter (errors.py)."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace

from .errors import UsageError
from .kernels import metric_registry

# the saliency's local scores (their registry: kernels/metric_registry.py), and SparseGPT's rule (masks chosen
# during the OBS sweep, no saliency)
SALIENCY_METRICS = metric_registry.METRICS
METRICS = (*SALIENCY_METRICS, "sparsegpt")
RECONSTRUCTIONS = ("none", "obs")
REFINEMENTS = ("none", "swaps")
# swaps per row of `refine` swaps (algorithm/refine.py): on SmolLM2-135M at 50%, 5/20/50 swaps gave 58.4/54.0/52.2
# on the calibration-domain check windows and 28.3/30.4/31.4 on another domain (docs/results.md, "Mask refinement")
REFINE_ITERS = 20
ALLOCATIONS = ("auto", "layer", "row", "global", "owl", "owl-row")
# what `allocation` auto (the default) means for an unstructured mask: the best mask-only budget measured on
# SmolLM2-135M's calibration-domain check windows (docs/results.md); N:M masks are cut per group of M
DEFAULT_ALLOCATION = "owl-row"
# named choices of what to run, chosen between their candidates on SmolLM2-135M's calibration-domain check
# windows (docs/results.md): quality = the Γ-guided OBS reconstruction with OWL's block sparsities (a second
# pass over the blocks); fast = mask only, OWL's block sparsities cut per output row, which `mask` re-cuts
# from the saliency in seconds. With an N:M pattern both keep the per-group cut (apply_settings).
PRESETS = {"fast": {"allocation": "owl-row"},
           "quality": {"reconstruct": "obs", "guide_alpha": 1.0, "allocation": "owl"}}
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


DEFAULT_NSAMPLES = 128  # calibration windows, as Wanda and SparseGPT take them
MAX_COUNT = 2**31 - 1  # windows, tokens per window, a batch, columns per OBS batch: a tensor dimension
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits
MAX_KAPPA = 2.0  # z - t is multiplied by (1 - kappa) every step: beyond 2 the recursion diverges to Inf/NaN


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _real(value) -> bool:
    """A finite real number (True and False are not numbers here, NaN and Inf are not finite)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_pattern(pattern: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N, M) with 0 < N < M. Raises UsageError otherwise."""
    if pattern is None or pattern == "unstructured":
        return None
    if isinstance(pattern, (tuple, list)):
        if len(pattern) != 2 or not all(_integer(v) for v in pattern):
            raise UsageError(f"`pattern`: expected 'unstructured', 'N:M' or a pair of integers (N, M), got {pattern!r}")
        n, m = pattern
    elif not isinstance(pattern, str):
        raise UsageError(f"`pattern`: expected 'unstructured' or 'N:M' (e.g. 2:4), got {pattern!r}")
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


def _positive_int(name: str, value, limit: int = MAX_COUNT) -> None:
    if not (_integer(value) and 1 <= value <= limit):
        raise UsageError(f"`{name}`: expected a positive integer (at most {limit}), got {value!r}")


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):  # "no" is truthy: a string must not switch an option on
        raise UsageError(f"`{name}`: expected True or False, got {value!r}")


def _seed(name: str, value) -> None:
    if not (_integer(value) and 0 <= value <= MAX_SEED):
        raise UsageError(f"`{name}`: expected an integer in [0, 2**64 - 1], got {value!r}")


def _path(name: str, value, optional: bool = False) -> str | None:
    """A path argument as a str (os.PathLike accepted), or a one-line error naming it."""
    if value is None and optional:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise UsageError(f"`{name}`: expected a path, got {type(value).__name__} {value!r:.100}")
    if not os.fspath(value):  # "" is the working directory to os.path.abspath
        raise UsageError(f"`{name}`: expected a path, got an empty string")
    return os.fspath(value)


def expect(name: str, value, kind: type, optional: bool = False) -> None:
    """Refuse an argument of another type than `kind` (None allowed when `optional`), naming it."""
    if not (isinstance(value, kind) or (optional and value is None)):
        raise UsageError(f"`{name}`: expected a {kind.__name__}{' or None' if optional else ''}, got "
                         f"{type(value).__name__} {value!r:.100}")


def or_default(**given) -> tuple:
    """Each keyword's (value, type) as that value, or type() for None; another type is a one-line error
    naming it (`config, run = or_default(config=(config, MaskConfig), run=(run, RunOptions))`)."""
    for name, (value, kind) in given.items():
        expect(name, value, kind, optional=True)
    return tuple(kind() if value is None else value for value, kind in given.values())


def check_api(paths: dict | None = None, **typed) -> None:
    """The arguments of a public function, before it uses any: `paths` {name: value} each a path (str or
    os.PathLike, not empty), each keyword a (value, type[, optional]) pair; the first wrong one is a
    one-line UsageError naming it (a str where a MaskSpec belongs fails later, deep inside, otherwise)."""
    for name, value in (paths or {}).items():
        _path(name, value)
    for name, given in typed.items():
        expect(name, *given)


def apply_settings(current: Mapping, defaults: Mapping, implied: Mapping, source: str) -> dict:
    """`current` options ({name: value}) with what `source` (a preset, Wanda's --prune_method, a recipe)
    implies: an option left at its default takes the implied value, one given otherwise is a contradiction
    (one line). With an N:M pattern an implied allocation gives way to the per-group cut."""
    out = dict(current)
    for name, value in implied.items():
        if name == "allocation" and out.get("pattern", "unstructured") != "unstructured":
            value = "layer"  # N:M masks are per group of M: there is no row or block budget to choose
        if name not in out:
            raise UsageError(f"{source} sets {name}, which has no option here")
        if out[name] == defaults.get(name):
            out[name] = value
        elif out[name] != value:
            raise UsageError(f"`{name}` {out[name]} contradicts {source}, which means `{name}` {value}")
    return out


@dataclass(frozen=True)
class MaskSpec:
    """Which mask to cut from a saliency.

    sparsity: fraction of entries removed, in (0, 1). With an N:M pattern it is implied (1 - N/M) and
    may be left None. allocation: 'layer' (per matrix), 'row' (per output row), 'global' (one
    threshold over all matrices, each matrix's sparsity within `bounds`) or 'owl' (per decoder block,
    from its outlier ratio: blocks with more entries above owl_m times the block's mean saliency keep
    more, within +-owl_lambda of `sparsity`, averaging exactly to it; OWL, Yin et al. 2024) or 'owl-row'
    (OWL's block sparsities, each output row of the block's matrices cut to its block's, as OWL cuts
    Wanda's scores; the total then differs from `sparsity`'s by the rounding of each row), or 'auto' (the
    default): DEFAULT_ALLOCATION for an unstructured mask (row where OWL's spread of +-owl_lambda around
    `sparsity` leaves (0, 1)), 'layer' (per group of M) for N:M. `allocation` holds the resolved name;
    `auto` says whether it was chosen so (a later option may then choose another, e.g. `guide_alpha`).
    """

    sparsity: float | None = None
    pattern: str = "unstructured"
    allocation: str = "auto"
    bounds: tuple[float, float] = (0.0, 0.99)
    owl_m: float = 5.0
    owl_lambda: float = 0.08

    def __post_init__(self) -> None:
        nm = self._settle_sparsity()
        bounds = self.bounds
        if not (isinstance(bounds, (tuple, list)) and len(bounds) == 2 and all(_real(b) for b in bounds)
                and 0 <= bounds[0] <= bounds[1] < 1):
            raise UsageError(f"`bounds`: expected (s_min, s_max) with 0 <= s_min <= s_max < 1, got {bounds!r}")
        object.__setattr__(self, "bounds", (float(bounds[0]), float(bounds[1])))
        if not (_real(self.owl_m) and self.owl_m > 0):
            raise UsageError(f"`owl_m`: expected a positive number, got {self.owl_m!r}")
        if not (_real(self.owl_lambda) and 0 <= self.owl_lambda):
            raise UsageError(f"`owl_lambda`: expected a non-negative number, got {self.owl_lambda!r}")
        self._settle_allocation(nm)

    def _settle_sparsity(self) -> tuple[int, int] | None:
        """The pattern in canonical form and the sparsity it implies (or 0.5); returns (N, M) or None."""
        if self.sparsity is not None and not _real(self.sparsity):
            raise UsageError(f"`sparsity`: expected a number in (0, 1), got {self.sparsity!r}")
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
        if not (_real(sparsity) and 0 < sparsity < 1):
            raise UsageError(f"`sparsity`: expected a number in (0, 1), got {self.sparsity!r}")
        object.__setattr__(self, "sparsity", float(sparsity))
        return nm

    def _settle_allocation(self, nm: tuple[int, int] | None) -> None:
        """`auto` resolved (and remembered, not as a field: reports and run keys name the resolved allocation),
        then the allocation checked against the pattern and OWL's spread."""
        _choice("allocation", self.allocation, ALLOCATIONS)
        spread = (self.sparsity - self.owl_lambda, self.sparsity + self.owl_lambda)
        fits = 0 <= spread[0] < spread[1] < 1
        object.__setattr__(self, "_auto", self.allocation == "auto")
        if self._auto:
            object.__setattr__(self, "allocation", "layer" if nm is not None else DEFAULT_ALLOCATION if fits else "row")
        if nm is not None and self.allocation != "layer":
            raise UsageError(f"`allocation` {self.allocation} cannot be combined with an N:M pattern")
        if self.allocation in OWL_ALLOCATIONS and not fits:
            raise UsageError(f"`owl_lambda` {self.owl_lambda} takes blocks outside (0, 1) around `sparsity` "
                             f"{self.sparsity}")

    @property
    def auto(self) -> bool:
        """Whether the allocation was left to `auto` (the default) rather than named."""
        return getattr(self, "_auto", False)

    def with_allocation(self, allocation: str) -> MaskSpec:
        """The same mask under another allocation."""
        return replace(self, allocation=allocation)

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
        if not (_real(guide_alpha) and guide_alpha >= 0):
            raise UsageError(f"`guide_alpha`: expected a non-negative number, got {guide_alpha!r}")
        if reconstruct != "obs":
            raise UsageError("`guide_alpha` guides the OBS sweep's choice of pruned entries: pass `reconstruct` obs")


def settle_refine(refine: str, refine_iters: int | None, guide_alpha: float | None,
                  metric: str = "stochria") -> int | None:
    """The checked refine settings: the swaps per row (None when `refine` is none)."""
    _choice("refine", refine, REFINEMENTS)
    if refine == "none":
        if refine_iters is not None:
            raise UsageError("`refine_iters` bounds the swaps of `refine` swaps: pass `refine` swaps too")
        return None
    if metric == "sparsegpt":
        raise UsageError("`refine` swaps refines a saliency's mask: `metric` sparsegpt chooses its masks during "
                         "the OBS sweep")
    if guide_alpha is not None:
        raise UsageError("`refine` swaps refines the saliency's mask: with `guide_alpha` the OBS sweep chooses "
                         "the pruned entries itself (drop one of the two)")
    if refine_iters is None:
        return REFINE_ITERS
    _positive_int("refine_iters", refine_iters)
    return refine_iters


def refine_settings(refine: str, refine_iters: int | None) -> dict:
    """The refine settings as a report records them: only when refining, so that reports (and run keys) of
    runs without it are what they were before the option existed."""
    return {} if refine == "none" else {"refine": refine, "refine_iters": refine_iters}


def settle_for_sweep(spec: MaskSpec, guide_alpha: float | None, metric: str = "stochria") -> MaskSpec:
    """`allocation` auto where the OBS sweep chooses the pruned entries, which it does per matrix: OWL's block
    sparsities (owl) for the guided sweep, SparseGPT's own per-matrix count (layer) for the sparsegpt metric."""
    if not spec.auto or spec.nm is not None or spec.allocation not in ("row", "owl-row"):
        return spec
    if guide_alpha is not None:
        return spec.with_allocation("owl" if spec.allocation == "owl-row" else "layer")
    return spec.with_allocation("layer") if metric == "sparsegpt" else spec


def check_guide(guide_alpha: float | None, spec: MaskSpec) -> None:
    if guide_alpha is not None and spec.per_row:
        raise UsageError(f"`guide_alpha`: the guided sweep chooses per matrix, not per row as `allocation` "
                         f"{spec.allocation} does (use layer, global or owl, or an N:M pattern)")


def _check_obs(percdamp, blocksize, true_sequential, diag_damp) -> None:
    if not (_real(percdamp) and 0 < percdamp):
        raise UsageError(f"`percdamp`: expected a positive fraction of the mean Hessian diagonal, got {percdamp!r}")
    if not (_real(diag_damp) and 0 <= diag_damp):
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
    size; lam: fraction of entries below the threshold t; batch_size: windows per mirror step (and the
    reconstruction's lanes, docs/method.md; under torchrun a multiple of the process count); seed:
    calibration windows and stochria subsets; reconstruct: 'obs' updates the kept weights after masking;
    guide_alpha (with reconstruct 'obs'): instead of the saliency's mask, let the sweep choose the pruned
    entries by SparseGPT's score times (saliency rank)^guide_alpha.
    saliency_update: 'exact' runs the recursion step by step over
    every entry; 'closed-form' (feedback none only) gets the same saliency from per-step vectors in one
    product per matrix (docs/method.md, "The closed form"); 'auto' is closed-form for feedback none.
    percdamp, blocksize: the OBS pass's dampening (fraction of the mean Hessian diagonal) and columns per
    lazy batch (SparseGPT's --percdamp and --blocksize); diag_damp: each input's H_ii grows by this fraction
    of itself (the Hessian shrunk toward its diagonal: a smaller update that fits the calibration text's
    input correlations less; 0 = SparseGPT's); true_sequential: each group of a block (q/k/v, o,
    gate/up, down) takes its Hessian from the block as reconstructed so far (GPTQ's --true-sequential), or,
    False, every group from the block as it came in, before any of it was pruned (llm-compressor's way).
    refine: 'swaps' improves the saliency's mask inside its budgets by swaps that lower each matrix's output
    error on the calibration inputs (docs/method.md, "Refinement"; before the OBS update when both are
    asked), at most refine_iters swaps per row (None: REFINE_ITERS).
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
    refine: str = "none"
    refine_iters: int | None = None

    def __post_init__(self) -> None:
        expect("mask", self.mask, MaskSpec)
        _choice("metric", self.metric, METRICS)
        _check_obs(self.percdamp, self.blocksize, self.true_sequential, self.diag_damp)
        _choice("saliency_update", self.saliency_update, SALIENCY_UPDATES)
        if not (_real(self.kappa) and 0 < self.kappa < MAX_KAPPA):
            raise UsageError(f"`kappa`: expected a step size in (0, {MAX_KAPPA:g}) (z - t is multiplied by 1 - kappa "
                             f"every step: beyond {MAX_KAPPA:g} the saliency diverges), got {self.kappa!r}")
        if not (_real(self.lam) and 0 <= self.lam < 1):
            raise UsageError(f"`lam`: expected a fraction in [0, 1), got {self.lam!r}")
        _seed("seed", self.seed)
        _choice("feedback", self.feedback, FEEDBACKS)
        if self.feedback == "full" and self.metric == "sparsegpt":
            raise UsageError("`feedback` full calibrates a saliency; `metric` sparsegpt has none")
        if self.feedback == "full" and self.saliency_update == "closed-form":
            raise UsageError("`saliency_update` closed-form needs frozen weights: `feedback` full moves them "
                             "(use exact or auto)")
        _check_compute(self.device, self.dtype, self.backend, self.reconstruct, self.batch_size, self.guide_alpha)
        object.__setattr__(self, "mask", settle_for_sweep(self.mask, self.guide_alpha, self.metric))
        check_guide(self.guide_alpha, self.mask)
        if self.metric == "sparsegpt" and self.guide_alpha is not None:
            raise UsageError("`guide_alpha` weighs the sweep by the saliency: `metric` sparsegpt has none")
        if self.metric == "sparsegpt":
            if self.reconstruct != "obs":
                raise UsageError("`metric` sparsegpt chooses its masks during the OBS sweep: pass `reconstruct` obs")
            if self.mask.nm is None and self.mask.allocation != "layer":
                raise UsageError(f"`metric` sparsegpt: `allocation` {self.mask.allocation} is not SparseGPT's rule "
                                 "(use layer, or an N:M pattern)")
        object.__setattr__(self, "refine_iters", settle_refine(self.refine, self.refine_iters, self.guide_alpha,
                                                               self.metric))

    @classmethod
    def from_options(cls, preset: str | None = None, **options) -> PruneConfig:
        """A PruneConfig from keyword options, PruneConfig's fields and MaskSpec's (sparsity, pattern,
        allocation, bounds, owl_m, owl_lambda) alike, under a named `preset` (PRESETS): an option the preset
        also sets must agree with it. `PruneConfig.from_options(sparsity=0.6, metric="wanda")`."""
        mask_fields = {f.name: f for f in fields(MaskSpec)}
        own_fields = {f.name: f for f in fields(cls) if f.name != "mask"}
        unknown = sorted(set(options) - set(mask_fields) - set(own_fields))
        if unknown:
            raise UsageError(f"`{unknown[0]}`: not an option of PruneConfig or MaskSpec (options: "
                             f"{', '.join(sorted([*own_fields, *mask_fields]))})")
        defaults = {name: f.default for name, f in {**mask_fields, **own_fields}.items()}
        current = {**defaults, **options}
        if preset is not None:
            _choice("preset", preset, tuple(PRESETS))
            current = apply_settings(current, defaults, PRESETS[preset], f"`preset` {preset}")
        return cls(mask=MaskSpec(**{name: current[name] for name in mask_fields}),
                   **{name: current[name] for name in own_fields})

    @classmethod
    def preset(cls, name: str, **options) -> PruneConfig:
        """The named preset (PRESETS: "fast", "quality") with `options` on top, as from_options takes them."""
        return cls.from_options(preset=name, **options)

    @property
    def has_saliency(self) -> bool:
        return self.metric != "sparsegpt"

    @property
    def closed_form(self) -> bool:
        """Whether the saliency is computed in closed form ('auto': whenever the weights are frozen)."""
        return self.saliency_update == "closed-form" or (self.saliency_update == "auto" and self.feedback == "none")

    def to_dict(self) -> dict:
        settings = asdict(self)
        obs = obs_settings(settings)  # first: they take their settings out of `settings`
        refine = refine_settings(settings.pop("refine"), settings.pop("refine_iters"))
        return {**settings, **obs, **refine}


@dataclass(frozen=True)
class MaskConfig:
    """What `mask_checkpoint` cuts from a saved saliency (`mask`) and how it computes: reconstruct 'obs' runs
    the OBS pass (it needs a Calibration), batch_size its lanes (a multiple of the process count under
    torchrun), guide_alpha, percdamp, blocksize, true_sequential, diag_damp, refine and refine_iters as
    PruneConfig's (refine swaps needs a Calibration too), and where (device, dtype, backend)."""

    mask: MaskSpec = field(default_factory=MaskSpec)
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
    refine: str = "none"
    refine_iters: int | None = None

    def __post_init__(self) -> None:
        expect("mask", self.mask, MaskSpec)
        _check_compute(self.device, self.dtype, self.backend, self.reconstruct, self.batch_size, self.guide_alpha)
        _check_obs(self.percdamp, self.blocksize, self.true_sequential, self.diag_damp)
        object.__setattr__(self, "mask", settle_for_sweep(self.mask, self.guide_alpha))
        check_guide(self.guide_alpha, self.mask)
        object.__setattr__(self, "refine_iters", settle_refine(self.refine, self.refine_iters, self.guide_alpha))


@dataclass(frozen=True)
class Calibration:
    """Where calibration windows come from: `calib` (c4, wikitext2, or a .txt / directory / .jsonl path),
    nsamples windows of seqlen tokens, tokenized with the tokenizer in `tokenizer_dir` (default: the
    model's). Left None: for `prune_checkpoint`, DEFAULT_NSAMPLES windows of the model's context as the papers
    take it (data.default_seqlen), as the CLI does; for `mask_checkpoint`, nsamples, seqlen and
    seed take the saliency's."""

    calib: str = "c4"
    nsamples: int | None = None
    seqlen: int | None = None
    tokenizer_dir: str | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "calib", _path("calib", self.calib))
        object.__setattr__(self, "tokenizer_dir", _path("tokenizer_dir", self.tokenizer_dir, optional=True))
        if self.nsamples is not None:
            _positive_int("nsamples", self.nsamples)
        if self.seqlen is not None and not (_integer(self.seqlen) and 2 <= self.seqlen <= MAX_COUNT):
            raise UsageError(f"`seqlen`: expected an integer from 2 to {MAX_COUNT}, got {self.seqlen!r}")
        if self.seed is not None:
            _seed("seed", self.seed)

    def with_defaults(self, nsamples: int, seqlen: int, seed: int | None = None) -> Calibration:
        """The same source with the values left None filled in."""
        return replace(self, nsamples=self.nsamples or nsamples, seqlen=self.seqlen or seqlen,
                       seed=self.seed if self.seed is not None else seed)

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
        for name in ("overwrite", "trust_remote_code", "dry_run"):
            check_flag(name, getattr(self, name))
        if self.progress is not None and not callable(self.progress):
            raise UsageError(f"`progress`: expected a callable progress(done, total) or None, got {self.progress!r}")


@dataclass(frozen=True)
class EvalOptions:
    """How `eval` loads and runs a model: where (device, dtype), windows per forward (batch_size), the tokenizer
    (tokenizer_dir, default: the model's) and whether a checkpoint's own modelling code may run."""

    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 8
    tokenizer_dir: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        _choice("device", self.device, DEVICES)
        _choice("dtype", self.dtype, DTYPES)
        _positive_int("batch_size", self.batch_size)
        _path("tokenizer_dir", self.tokenizer_dir, optional=True)
        check_flag("trust_remote_code", self.trust_remote_code)

"""UniPruning as an llm-compressor (0.14) modifier, for recipes that mix pruning with quantization:

    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from unipruning.integrations.llmcompressor import UniPruningModifier

    oneshot(model=model, dataset=windows, recipe=[
        UniPruningModifier(sparsity=0.5, mask_structure="2:4", ignore=["lm_head"]),
        QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"])])

How it runs (docs/python.md, "llm-compressor"). llm-compressor's sequential pipeline runs the calibration
batches through one decoder layer at a time. Forward pre-hooks on the planned linears (registered the way its
own modifiers register theirs, so that its propagation pass does not fire them) record each input's sum of x^2
per batch (metrics.ActivationStats): one batch of oneshot is one calibration step of `batch_size` windows. At
the end of a layer's epoch, before any modifier changes the layer, the saliency of its matrices is computed
from those records by the library's own code (pipeline/calibrate.saliency_from_history: the closed form, or
the exact recursion); masks are cut by algorithm/masks.MaskCutter and written with +0.0 zeros:

- when the modifier has its calibration pass to itself (oneshot's default pipeline, "independent", gives each
  modifier its own; or it is alone): after the last layer. No layer is pruned while the pipeline runs, so every
  layer is calibrated on the outputs of the dense layers before it, as `unipruning prune` calibrates, and the
  allocations across blocks (owl-row, the default for unstructured masks, owl and global) see every block's
  saliency: the masks are those of `unipruning prune` on the same windows;
- when other modifiers share its pass (pipeline "sequential"): at the end of each layer's epoch, so that the
  modifiers after it calibrate the pruned layer. Only per-layer allocations (layer, row, N:M) can be cut then;
  the later layers are calibrated on what llm-compressor propagates, the pruned layers' outputs (unless
  oneshot(..., propagate_error=False)).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from functools import partial

import torch
from torch.utils.data import DataLoader

try:
    from compressed_tensors.offload import update_offload_parameter
    from compressed_tensors.utils import match_named_modules, match_targets
    from llmcompressor.core import active_session
    from llmcompressor.modifiers import Modifier
    from pydantic import Field, PrivateAttr, model_validator
except ImportError as exc:  # the optional extra; its own traceback would only repeat the line
    from . import not_importable

    raise ImportError(not_importable(__name__, "llmcompressor", "llm-compressor 0.14", "llmcompressor", exc)) from None

from .. import backends, llmc
from ..algorithm.masks import MaskCutter, check_plan, mask_stats, masked
from ..algorithm.metrics import ActivationStats
from ..config import OWL_ALLOCATIONS, Calibration, PruneConfig, apply_settings
from ..errors import UsageError
from ..lazy import LazyMapping
from ..models import Experts, Matrix, family_for, model_matrices, num_blocks, piece, weight_of
from ..pipeline.calibrate import saliency_from_history

log = logging.getLogger("unipruning")

__all__ = ["UniPruningModifier", "calibration_loader"]

_NAME = "UniPruningModifier"
# z of the matrices being cut kept in memory up to this; beyond, recomputed from the recorded statistics when
# read again (the closed form: one product per matrix). owl reads each z three times, global once per pass
Z_CACHE_BYTES = 2 << 30


class UniPruningModifier(Modifier):
    """UniPruning's saliency learned from llm-compressor's calibration pass, and masks cut from it.

    llm-compressor's names, as its SparseGPTModifier and WandaPruningModifier take them: sparsity (one number;
    with an N:M mask_structure it is ignored, as there), mask_structure ("0:0" unstructured, "N:M" prunes N of
    every M: only N:2N, e.g. 2:4, for which unipruning's pattern, which keeps N, means the same), targets (the
    modules holding the pruned linears, default every Linear) and ignore (compressed-tensors' matching:
    "re:REGEX", a module name or a class name), sparsity_profile "owl" (an OWL allocation: owl-row unless
    `allocation` says owl) with owl_m and owl_lmbda (default 5 and 0.08 here).

    unipruning's, as PruneConfig.from_options takes them: metric, allocation (auto: owl-row for unstructured,
    per group for N:M), preset (fast; quality needs the OBS pass, which `unipruning prune` runs), kappa, lam,
    seed (keys stochria's subsets), bounds (global), saliency_update, backend. A calibration step is one batch of
    oneshot (its batch_size); the model's own dtype and device compute.
    """

    requires_calibration_data: bool = True

    sparsity: float | None = None
    mask_structure: str = "0:0"
    targets: str | list[str] = Field(default_factory=lambda: ["Linear"])
    ignore: list[str] = Field(default_factory=list)
    sparsity_profile: str | None = None
    owl_m: float | None = None
    owl_lmbda: float | None = None
    sequential_update: bool | None = None  # deprecated in llm-compressor (always on): accepted, so its recipes load

    metric: str = "stochria"
    allocation: str = "auto"
    preset: str | None = None
    kappa: float = 0.01
    lam: float = 0.001
    seed: int = 0
    bounds: tuple[float, float] = (0.0, 0.99)
    saliency_update: str = "auto"
    backend: str = "auto"

    _config: PruneConfig | None = PrivateAttr(default=None)
    _plan: dict = PrivateAttr(default_factory=dict)  # {matrix name: MaskSpec}
    _matrices: dict = PrivateAttr(default_factory=dict)  # {matrix name: Matrix}, the planned ones
    _waiting: list = PrivateAttr(default_factory=list)  # planned matrices whose saliency is not learned yet
    _records: dict = PrivateAttr(default_factory=dict)  # {source: {batch index: ActivationStats}}
    _unseen: set = PrivateAttr(default_factory=set)  # matrices whose input saw no token
    _steps: int = PrivateAttr(default=0)
    _per_layer: bool = PrivateAttr(default=False)
    _kernels: str = PrivateAttr(default="torch")
    _masked: dict = PrivateAttr(default_factory=dict)  # {matrix name: mask_stats}

    @model_validator(mode="after")
    def _check(self) -> UniPruningModifier:
        self._config = self.prune_config()
        return self

    def prune_config(self) -> PruneConfig:
        """The PruneConfig these arguments mean (what `unipruning prune` would run with them)."""
        if self.metric == "sparsegpt":
            raise UsageError("`metric` sparsegpt is SparseGPT's rule, with no saliency: use llm-compressor's "
                             "SparseGPTModifier")
        options = {"metric": self.metric, "allocation": self.allocation, "kappa": self.kappa, "lam": self.lam,
                   "seed": self.seed, "bounds": self.bounds, "saliency_update": self.saliency_update,
                   "backend": self.backend, **llmc.structure_settings(self.sparsity, self.mask_structure, _NAME)}
        options.update({k: v for k, v in (("owl_m", self.owl_m), ("owl_lambda", self.owl_lmbda)) if v is not None})
        if self.sparsity_profile is not None:
            if str(self.sparsity_profile).lower() != "owl":
                raise UsageError(f"`sparsity_profile`: expected owl (llm-compressor's one profile) or None, got "
                                 f"{self.sparsity_profile!r}")
            if options["allocation"] not in OWL_ALLOCATIONS:
                options = apply_settings(options, {"allocation": "auto"}, {"allocation": "owl-row"},
                                         "`sparsity_profile` owl")
        config = PruneConfig.from_options(preset=self.preset, **options)
        if config.reconstruct != "none":
            raise UsageError(f"`preset` {self.preset} runs the OBS reconstruction pass, which the modifier does not: "
                             "use preset fast, or `unipruning prune`")
        return config

    # ------------------------------------------------------------------ llm-compressor's lifecycle
    def on_initialize(self, state, **kwargs) -> bool:
        model = state.model
        if any(isinstance(e, Experts) for e in family_for(model.config).entries):
            raise UsageError(f"{_NAME}: MoE experts are not supported inside llm-compressor (it linearizes them): "
                             "prune the model with `unipruning prune`")
        if state.data is None or state.data.calib is None:
            raise UsageError(f"{_NAME} learns from calibration data: pass `dataset` to oneshot")
        self._steps = len(state.data.calib)
        matrices = model_matrices(model)
        self._plan = _plan(model, matrices, self.targets, self.ignore, self._config.mask)
        check_plan({m.name: m.shape for m in matrices}, self._plan)
        self._matrices = {m.name: m for m in matrices if m.name in self._plan}
        self._waiting = list(self._matrices.values())
        return True

    def on_calibration_start(self, state, event, **kwargs) -> None:
        others = [m for m in active_session().lifecycle.recipe.modifiers if m is not self]
        self._per_layer = bool(others)
        if self._per_layer and self._config.mask.cross_block:
            raise UsageError(
                f"{_NAME}: `allocation` {self._config.mask.allocation} needs every block's saliency before any mask, "
                f"but {type(others[0]).__name__} shares its calibration pass and calibrates each layer as it goes: "
                "run oneshot with its default pipeline (independent), or use allocation layer or row, or an N:M "
                "mask_structure")
        model = state.model
        first = model.get_submodule(next(iter(self._matrices.values())).module)
        self._kernels = backends.resolve(self._config.backend, _execution_device(first))
        if self._config.metric == "magnitude":
            return  # |W| alone: no activations
        for source in dict.fromkeys(m.source for m in self._matrices.values()):
            self.register_hook(model.get_submodule(source), partial(self._observe, source), "forward_pre")

    def _observe(self, source: str, module: torch.nn.Module, args: tuple) -> None:
        x = args[0]
        batch = active_session().state.current_batch_idx
        steps = self._records.setdefault(source, {})
        if batch not in steps:
            steps[batch] = ActivationStats(x.shape[-1], x.device, self._kernels)
        steps[batch].add(x)

    def on_sequential_epoch_end(self, state, event, modules=(), **kwargs) -> None:
        done = {id(m) for m in modules}
        ready = [m for m in self._waiting if id(state.model.get_submodule(m.module)) in done]
        self._waiting = [m for m in self._waiting if m not in ready]
        if self._per_layer:
            self._prune(state.model, [m.name for m in ready])

    def on_calibration_end(self, state, event, **kwargs) -> None:
        self.remove_hooks()
        self._prune(state.model, [n for n in self._plan if n not in self._masked])
        total = sum(s["numel"] for s in self._masked.values())
        kept = sum(s["kept"] for s in self._masked.values())
        log.info("%s: %d matrices pruned, %.4f sparsity", _NAME, len(self._masked), 1 - kept / max(total, 1))
        if self._unseen:
            log.warning("%s: %d matrices saw no calibration token (%s...): their masks are cut by |W|", _NAME,
                        len(self._unseen), sorted(self._unseen)[0])

    def on_finalize(self, state, **kwargs) -> bool:
        self.remove_hooks()
        if len(self._masked) != len(self._plan):
            raise UsageError(f"{_NAME}: {len(self._plan) - len(self._masked)} planned matrices were never pruned (did "
                             "the calibration pass run?)")
        self._records = {}
        return True

    @property
    def masked(self) -> dict:
        """{matrix name: what the report says of its mask} of the matrices pruned so far."""
        return dict(self._masked)

    # ------------------------------------------------------------------ saliency and masks
    def _history(self, source: str, device: torch.device) -> list[tuple[torch.Tensor, int]]:
        """Every step's (sum of x^2, tokens) of one input, on `device`; a batch it did not see counts no token."""
        steps = self._records.get(source, {})
        empty = torch.zeros(0, dtype=torch.float64, device=device)
        return [(steps[k].sqsum.to(device), steps[k].tokens) if k in steps else (empty, 0) for k in range(self._steps)]

    def _saliency(self, model: torch.nn.Module, name: str) -> torch.Tensor:
        """z of one planned matrix from its input's records and its weight as it is now."""
        m = self._matrices[name]
        device = weight_of(model, m).device
        history = {} if self._config.metric == "magnitude" else {m.source: self._history(m.source, device)}
        z, _, unseen = saliency_from_history(model, [m], history, self._steps, self._config, self._kernels)
        self._unseen.update(unseen)
        return z[name]

    def _prune(self, model: torch.nn.Module, names: list[str]) -> None:
        """Cut the masks of `names` (for a cross-block allocation, every planned matrix at once) and write them.
        z is computed when the cut reads it, and kept while it fits Z_CACHE_BYTES (owl reads it three times)."""
        if not names:
            return
        z = LazyMapping(names, partial(self._saliency, model), Z_CACHE_BYTES)
        weights = LazyMapping(names, lambda n: weight_of(model, self._matrices[n]))
        cut = MaskCutter(z, {n: self._plan[n] for n in names}, self._config.mask, self._kernels, weights=weights)
        if cut.block_sparsities is not None:
            log.info("%s: OWL block sparsities %s", _NAME, {b: round(s, 4) for b, s in cut.block_sparsities.items()})
        by_module = defaultdict(list)
        for n in names:
            by_module[self._matrices[n].module].append(self._matrices[n])
        for path, group in by_module.items():
            self._write(model.get_submodule(path), group, cut)
        needed = {self._matrices[n].source for n in self._plan if n not in self._masked}
        self._records = {s: r for s, r in self._records.items() if s in needed}

    @torch.no_grad()
    def _write(self, module: torch.nn.Module, group: list[Matrix], cut: MaskCutter) -> None:
        """The module's weight with its matrices' masks applied, written back (offloaded or not)."""
        weight = module.weight.detach().clone()
        for m in group:
            view = piece(weight, m.expert, m.rows)
            keep = cut(m.name, view)
            view.copy_(masked(view, keep))
            self._masked[m.name] = mask_stats(keep, self._plan[m.name].nm)
        update_offload_parameter(module, "weight", weight)


def _batch(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    ids = torch.stack(rows)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def calibration_loader(windows: torch.Tensor, batch_size: int = 1) -> DataLoader:
    """Token windows ((nsamples, seqlen) ids, e.g. unipruning.data.calibration_windows') as oneshot's `dataset`:
    in their order, `batch_size` windows per batch, that is per calibration step, as `unipruning prune
    --batch-size` takes them. (A datasets.Dataset goes through llm-compressor's sampler, which orders it by
    length with an unstable sort: beyond 16 windows of one length, they come in another order, and the saliency
    depends on the order of its steps.)"""
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype not in (torch.int32, torch.int64):
        raise UsageError("`windows`: expected token ids of shape (nsamples, seqlen)")
    Calibration(nsamples=int(windows.shape[0])).steps(batch_size)
    return DataLoader(list(windows.to(torch.int64)), batch_size=batch_size, shuffle=False, collate_fn=_batch)


def _execution_device(module: torch.nn.Module) -> torch.device:
    from compressed_tensors.offload import get_execution_device

    device = get_execution_device(module)
    return torch.device("cpu") if device == "disk" else torch.device(device)


def _plan(model: torch.nn.Module, matrices: list[Matrix], targets, ignore: list[str], spec) -> dict:
    """{matrix name: spec} of the prunable matrices inside (or equal to) a module `targets` names and not
    `ignore`d, matched as llm-compressor's sparsity modifiers match them (compressed-tensors)."""
    layers = {name for name, _ in match_named_modules(model, targets)}
    plan = {m.name: spec for m in matrices
            if any(a in layers for a in llmc.ancestors(m.module))
            and not match_targets(m.module, model.get_submodule(m.module), ignore)}
    if not plan:
        raise UsageError(f"{_NAME}: `targets` {targets!r} and `ignore` {ignore!r} leave no prunable matrix (of "
                         f"{len(matrices)} in {num_blocks(model.config)} blocks)")
    return plan

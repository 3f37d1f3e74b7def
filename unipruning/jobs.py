"""The jobs, in memory and on checkpoint directories: `prune`, `apply_masks`, `prune_checkpoint`,
`mask_checkpoint` (eval lives in evaluate.py). Each checks its inputs, chooses its mode once and hands
the work to the pipeline.

In memory: `prune(model, calibration_batches, config)` -> PruneResult(saliency, masks, report); the
model is not modified (`apply_masks` does that). On directories, `prune_checkpoint` and `mask_checkpoint`
write a pruned checkpoint through the same export (pipeline/export.py), so `mask` from a saved saliency
is bit-identical to `prune` with the same settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from . import backends
from .algorithm.masks import MaskCutter, check_plan, mask_stats, masked
from .algorithm.obs import ObsSettings
from .backends import resolve_device, resolve_dtype
from .config import Calibration, MaskConfig, MaskSpec, PruneConfig, RunOptions, check_guide
from .data import calibration_windows, hub_source, windows_hash
from .errors import UsageError
from .io.checkpoint import (
    LazyCheckpoint,
    check_finite,
    check_seqlen,
    check_token_ids,
    load_config,
    load_tokenizer,
)
from .io.report import Report, Totals
from .io.saliency import Saliency
from .io.staging import partial_directory, preflight, writing
from .models import FAMILIES, family_for, fingerprint, model_matrices, num_blocks, weight_of
from .pipeline import distributed
from .pipeline.calibrate import calibrate
from .pipeline.export import (
    export_checkpoint,
    finish,
    masked_by,
    note_allocation,
    obs_choice,
    obs_rule,
    pruned_writer,
    reconstruct_pass,
    reconstructed_weights,
    saliency_cutter,
    streamed_writes,
)
from .pipeline.saliency import BLOCK_STATE, learn_from_checkpoint, learn_in_memory
from .targeting import Targeting
from .version import __version__


@dataclass
class PruneResult:
    saliency: Saliency
    masks: dict[str, torch.Tensor]
    report: Report


# ------------------------------------------------------------------------------------------ in memory
def _as_windows(calibration_batches: torch.Tensor | Iterable[torch.Tensor]) -> torch.Tensor:
    if isinstance(calibration_batches, torch.Tensor):
        windows = calibration_batches
    else:
        windows = torch.cat([torch.as_tensor(b).reshape(-1, torch.as_tensor(b).shape[-1]) for b in calibration_batches])
    if windows.dim() != 2 or windows.dtype not in (torch.int32, torch.int64):
        raise UsageError("`calibration_batches`: expected token ids of shape (nsamples, seqlen)")
    return windows.to(torch.int64)


def prune(model: nn.Module, calibration_batches: torch.Tensor | Iterable[torch.Tensor],
          config: PruneConfig | None = None, targeting: Targeting | None = None) -> PruneResult:
    """Learn the saliency of `model` on token windows and cut the masks of `config.mask`.

    calibration_batches: (nsamples, seqlen) token ids, or an iterable of (B, seqlen) tensors (joined,
    then split into steps of `config.batch_size` windows). The model's weights are left untouched
    (feedback "full" fine-tunes along the trajectory and restores them). `masks` is keyed by the
    matrices' logical names (models.Matrix); targeting restricts what is masked."""
    config, targeting = config or PruneConfig(), targeting or Targeting()
    if config.reconstruct != "none" or not config.has_saliency:
        raise UsageError("prune(): weight reconstruction changes weights and runs on checkpoints: use "
                         "prune_checkpoint(model_dir, out, config, calibration)")
    windows = _as_windows(calibration_batches)
    Calibration(nsamples=int(windows.shape[0])).steps(config.batch_size)
    matrices = model_matrices(model)
    for m in matrices:
        check_finite(m.name, weight_of(model, m), "model")
    plan, skipped = targeting.plan(matrices, num_blocks(model.config), config.mask)
    check_plan({m.name: m.shape for m in matrices}, plan)
    start = time.perf_counter()
    device = resolve_device(config.device)
    saliency, calibration = learn_in_memory(model, windows, config, device)
    backend = backends.resolve(config.backend, device)
    weights = {m.name: weight_of(model, m).detach().to(device) for m in matrices if m.name in plan}
    cut = MaskCutter(saliency.z, plan, config.mask, backend, weights=weights)
    masks = {name: cut(name, weights[name]).cpu() for name in plan}
    stats = {name: mask_stats(keep, plan[name].nm) for name, keep in masks.items()}
    report = Report(settings=config.to_dict(), matrices=stats,
                    total=Totals.of(stats, sum(p.numel() for p in model.parameters())),
                    targeting={**targeting.to_dict(), "skipped": skipped},
                    calibration={"windows_sha256": windows_hash(windows), "shape": list(windows.shape)})
    if config.feedback == "full":
        report.feedback = calibration
    else:
        report.blocks = calibration
    report.wall_seconds = time.perf_counter() - start
    return PruneResult(saliency=saliency, masks=masks, report=report)


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


# ------------------------------------------------------------------------------------------ on directories
@dataclass
class _Source:
    """A model directory opened for a job: its config, lazy checkpoint and the targeting plan."""

    model_dir: str
    config: object
    checkpoint: LazyCheckpoint
    plan: dict[str, MaskSpec]
    skipped: dict[str, str]


def _obs_settings(config: PruneConfig | MaskConfig) -> ObsSettings:
    return ObsSettings(config.percdamp, config.blocksize, config.true_sequential, config.diag_damp)


def _open(model_dir: str, spec: MaskSpec, targeting: Targeting, trust_remote_code: bool, reconstruct: str) -> _Source:
    config = load_config(model_dir, trust_remote_code)
    checkpoint = LazyCheckpoint(model_dir, config)
    plan, skipped = targeting.plan(checkpoint.matrices, num_blocks(config), spec)
    check_plan(checkpoint.shapes(), plan)
    family = family_for(config)
    if reconstruct == "obs" and (family.sequential is None or not all(m.plain for m in checkpoint.matrices
                                                                         if m.name in plan)):
        supported = sorted(t for f in FAMILIES if f.sequential is not None for t in f.model_types)
        raise UsageError(f"`reconstruct` obs supports models whose prunable matrices are whole linears "
                         f"({', '.join(supported)}); {config.model_type} has fused or expert matrices")
    return _Source(model_dir, config, checkpoint, plan, skipped)


def _inputs(model_dir: str, calibration: Calibration | None, targeting: Targeting,
            saliency_dir: str | None = None) -> dict[str, str | None]:
    """{parameter: path} of everything a job reads: `out` must be none of them, inside none, contain none."""
    calib = None if calibration is None else calibration.calib
    hub = None if calib is None else hub_source(calib)
    calib = calib if hub is None else hub[1]  # c4:DIR reads DIR; c4 alone, the hub's cache
    return {"model_dir": model_dir, "saliency_dir": saliency_dir, "calib": calib, "recipe": targeting.recipe,
            "tokenizer_dir": None if calibration is None else calibration.tokenizer_dir}


def _windows(source: _Source, calibration: Calibration, seed: int) -> tuple[torch.Tensor, dict]:
    """The calibration windows and their report entry."""
    check_seqlen(source.config, calibration.seqlen)
    tokenizer_dir = calibration.tokenizer_dir or source.model_dir
    windows = calibration_windows(load_tokenizer(tokenizer_dir), calibration.calib, calibration.nsamples,
                                  calibration.seqlen, seed)
    check_token_ids(source.config, windows, tokenizer_dir)
    return windows, {"source": calibration.calib, "nsamples": calibration.nsamples, "seqlen": calibration.seqlen,
                     "windows_sha256": windows_hash(windows)}


def _run_key(source: _Source, config: PruneConfig, windows_sha: str, device, backend, targeting) -> str:
    """A hash of everything that decides a prune's output: it names the run's partial directory."""
    return hashlib.sha256(json.dumps({
        "source": source.checkpoint.content_sha256(), "fingerprint": fingerprint(source.config,
                                                                                 source.checkpoint.shapes()),
        "version": __version__, "windows": windows_sha, "config": config.to_dict(), "device": device.type,
        "backend": backend, "targeting": targeting.to_dict(),
    }, sort_keys=True).encode()).hexdigest()


def _check_processes(config: PruneConfig) -> None:
    rank, processes = distributed.world()
    if processes > 1 and (config.batch_size % processes or not config.has_saliency or config.feedback == "full"):
        raise UsageError(f"{processes} processes: `batch_size` must be a multiple of the process count and the "
                         "saliency must be layer-streamed (not `metric` sparsegpt, not `feedback` full)")


def prune_checkpoint(model_dir: str, out: str, config: PruneConfig, calibration: Calibration | None = None,
                     run: RunOptions | None = None, targeting: Targeting | None = None) -> Report:
    """`unipruning prune`: calibrate on `calibration`, write the pruned checkpoint, saliency and report to
    `out`. With run.dry_run, return the plan (pipeline/planning.py) and write nothing."""
    start, targeting = time.perf_counter(), targeting or Targeting()
    calibration, run = calibration or Calibration(), run or RunOptions()
    source = _open(model_dir, config.mask, targeting, run.trust_remote_code, config.reconstruct)
    calibration.steps(config.batch_size)
    sources = _inputs(model_dir, calibration, targeting)
    device = distributed.init_from_env(resolve_device(config.device))
    preflight(out, run.overwrite, sources, lock=distributed.is_main())  # rank 0 takes the lock, soon
    backend, dtype = backends.resolve(config.backend, device), resolve_dtype(config.dtype, source.config, device)
    _check_processes(config)
    if config.feedback == "full":
        from .pipeline.feedback import check_fits

        check_fits(source.checkpoint, dtype, device)
    windows, calib_entry = _windows(source, calibration, config.seed)
    if run.dry_run:  # every check of the real run has passed: the plan, nothing written
        from .pipeline.planning import dry_run_plan

        return dry_run_plan(source.checkpoint, source.plan, source.skipped, config, calibration, device, dtype)
    run_key = _run_key(source, config, calib_entry["windows_sha256"], device, backend, targeting)
    if distributed.world()[0] != 0:  # a data-parallel worker: its share of every step, nothing written
        return _prune_worker(source, windows, config, device, dtype, out, run_key, run)
    report = Report(command="prune", model=os.path.abspath(model_dir), targeting=targeting.to_dict(),
                    settings={**config.to_dict(), "backend_used": backend, "device_used": str(device)},
                    calibration=calib_entry, processes=distributed.world()[1])
    with writing(out, run.overwrite, sources, run_key) as staging:
        return _prune_into(staging, source, windows, config, device, dtype, backend, report, run, start)


def _prune_worker(source: _Source, windows, config, device, dtype, out: str, run_key: str, run: RunOptions) -> Report:
    state_dir = os.path.join(partial_directory(out, run_key), BLOCK_STATE)
    distributed.barrier()  # rank 0 holds the lock and has made the partial directory
    calibrate(source.checkpoint.skeleton(dtype), windows, config, device, source.checkpoint,
              state_dir if os.path.isdir(state_dir) else None, offload=run.offload)
    rank, processes = distributed.world()
    return Report(command="prune", rank=rank, processes=processes)


def _prune_into(staging: str, source: _Source, windows, config: PruneConfig, device, dtype, backend: str,
                report: Report, run: RunOptions, start: float) -> Report:
    """The prune job inside its (resumable) staging directory: calibrate, reconstruct, export."""
    state_dir = os.path.join(staging, BLOCK_STATE)
    os.makedirs(state_dir, exist_ok=True)
    distributed.barrier()  # the workers may now look for finished blocks in it
    writer = pruned_writer(source.checkpoint, staging, source.plan)
    # masks that need no other block's saliency: each block's weights are written as it finishes
    streamed = (config.feedback == "none" and config.reconstruct == "none" and config.has_saliency
                and not config.mask.cross_block)
    report.weights_written = "per block during calibration" if streamed else "after calibration"
    on_block = streamed_writes(writer, source.plan, config.mask, backend, device) if streamed else None
    saliency = learn_from_checkpoint(source.checkpoint, windows, config, device, dtype, state_dir, on_block, run,
                                     report, start)
    cut = None if saliency is None else saliency_cutter(source.checkpoint, saliency, source.plan, config.mask,
                                                        backend, device)
    note_allocation(report, cut, config.mask)
    pruned, recon_dir = (None if cut is None else masked_by(cut)), None
    if config.reconstruct == "obs":
        recon_dir, report.reconstruction = reconstruct_pass(staging, source.checkpoint, windows, config.batch_size,
                                                            device, dtype, source.plan,
                                                            obs_choice(cut, config.guide_alpha, backend), backend,
                                                            run.progress, run.offload,
                                                            _obs_settings(config))
        report.reconstruction["rule"] = obs_rule(cut, config.guide_alpha)
        pruned = reconstructed_weights(recon_dir)
    report = export_checkpoint(source.checkpoint, staging, writer, pruned, source.plan, source.skipped, saliency,
                               config.mask, report)
    return finish(staging, report, start, state_dir, recon_dir)


def mask_checkpoint(model_dir: str, saliency_dir: str, out: str, spec: MaskSpec, config: MaskConfig | None = None,
                    calibration: Calibration | None = None, run: RunOptions | None = None,
                    targeting: Targeting | None = None) -> Report:
    """`unipruning mask`: new masks from a saved saliency, no calibration; with config.reconstruct "obs"
    the kept weights are reconstructed on `calibration` (nsamples, seqlen, seed default to the saliency's)."""
    start, targeting = time.perf_counter(), targeting or Targeting()
    config, run = config or MaskConfig(), run or RunOptions()
    check_guide(config.guide_alpha, spec)
    source = _open(model_dir, spec, targeting, run.trust_remote_code, config.reconstruct)
    if config.reconstruct == "obs" and calibration is None:
        raise UsageError("`reconstruct` obs: pass `calib` (the windows are run through the pruned model)")
    sources = _inputs(model_dir, calibration, targeting, saliency_dir)
    preflight(out, run.overwrite, sources)
    device = resolve_device(config.device)
    backend = backends.resolve(config.backend, device)
    shapes = source.checkpoint.shapes()
    saliency = Saliency.load(saliency_dir, expect_fingerprint=fingerprint(source.config, shapes),
                             expect_source=source.checkpoint.content_sha256())
    if saliency.shapes != shapes:
        raise UsageError("`saliency_dir`: its matrices do not match the model's prunable matrices")
    report = Report(command="mask", model=os.path.abspath(model_dir), saliency=os.path.abspath(saliency_dir),
                    settings={**saliency.metadata, "reconstruct": config.reconstruct, "guide_alpha": config.guide_alpha,
                              "backend_used": backend, "device_used": str(device)}, targeting=targeting.to_dict())
    windows = None
    if config.reconstruct == "obs":
        meta = saliency.metadata
        calibration = Calibration(calibration.calib, calibration.nsamples or meta["nsamples"],
                                  calibration.seqlen or meta["seqlen"], calibration.tokenizer_dir,
                                  meta["seed"] if calibration.seed is None else calibration.seed)
        calibration.steps(config.batch_size)
        windows, report.calibration = _windows(source, calibration, calibration.seed)
        report.calibration["seed"] = calibration.seed
    with writing(out, run.overwrite, sources) as staging:
        cut = saliency_cutter(source.checkpoint, saliency, source.plan, spec, backend, device)
        note_allocation(report, cut, spec)
        pruned, recon_dir = masked_by(cut), None
        if windows is not None:
            recon_dir, report.reconstruction = reconstruct_pass(
                staging, source.checkpoint, windows, config.batch_size, device,
                resolve_dtype(config.dtype, source.config, device), source.plan,
                obs_choice(cut, config.guide_alpha, backend), backend, run.progress, run.offload,
                _obs_settings(config))
            report.reconstruction["rule"] = obs_rule(cut, config.guide_alpha)
            pruned = reconstructed_weights(recon_dir)
        writer = pruned_writer(source.checkpoint, staging, source.plan)
        report = export_checkpoint(source.checkpoint, staging, writer, pruned, source.plan, source.skipped, saliency,
                                   spec, report)
        return finish(staging, report, start, recon_dir)


__all__ = ["PruneResult", "apply_masks", "mask_checkpoint", "prune", "prune_checkpoint"]

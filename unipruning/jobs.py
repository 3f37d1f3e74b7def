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
from dataclasses import dataclass, replace

import torch
from torch import nn

from . import backends
from .algorithm.masks import MaskCutter, check_masks, check_plan, check_weight, mask_stats, masked
from .algorithm.obs import ObsSettings
from .backends import resolve_device, resolve_dtype
from .config import (
    DEFAULT_NSAMPLES,
    Calibration,
    MaskConfig,
    MaskSpec,
    PruneConfig,
    RunOptions,
    check_api,
    or_default,
    refine_settings,
)
from .data import calibration_windows, check_window_ids, default_seqlen, hub_source, windows_hash
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
    RECON_STATE,
    Pruned,
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
from .pipeline.job import Job
from .pipeline.learn import BLOCK_STATE, learn_from_checkpoint, learn_in_memory
from .pipeline.reconstruct import PassSteps, decided_by_rank_0, reconstruct
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
          config: PruneConfig | None = None, targeting: Targeting | None = None, **options) -> PruneResult:
    """Learn the saliency of `model` on token windows and cut the masks of `config.mask`:

        result = prune(model, windows, sparsity=0.5, pattern="2:4", preset="fast")   # keyword options, or
        result = prune(model, windows, PruneConfig(mask=MaskSpec(sparsity=0.6)))      # a config object

    calibration_batches: (nsamples, seqlen) token ids, or an iterable of (B, seqlen) tensors (joined,
    then split into steps of `config.batch_size` windows). options: PruneConfig's and MaskSpec's fields and
    `preset` (PruneConfig.from_options), instead of `config`. The model's weights are left untouched
    (feedback "full" fine-tunes along the trajectory and restores them; `apply_masks` prunes them). `masks`
    is keyed by the matrices' logical names (models.Matrix); targeting restricts what is masked; `report` is the
    typed Report."""
    if options:
        if config is not None:
            raise UsageError("prune(): pass either `config` or keyword options (sparsity=..., preset=...), not both")
        config = PruneConfig.from_options(**options)
    config, targeting = config or PruneConfig(), targeting or Targeting()
    check_api(model=(model, nn.Module), config=(config, PruneConfig), targeting=(targeting, Targeting))
    if config.reconstruct != "none" or not config.has_saliency:
        raise UsageError("prune(): weight reconstruction changes weights and runs on checkpoints: use "
                         "prune_checkpoint(model_dir, out, config, calibration)")
    if config.refine != "none":
        raise UsageError("prune(): `refine` swaps runs a pass over the pruned blocks of a checkpoint: use "
                         "prune_checkpoint(model_dir, out, config, calibration)")
    windows, matrices = _checked_inputs(model, calibration_batches, config.batch_size)
    config = replace(config, mask=targeting.settle(config.mask))
    plan, skipped = targeting.plan(matrices, num_blocks(model.config), config.mask)
    check_plan({m.name: m.shape for m in matrices}, plan)
    start = time.perf_counter()
    device = resolve_device(config.device)
    job = Job(checkpoint=None, plan=plan, skipped=skipped, device=device, dtype=next(model.parameters()).dtype,
              backend=backends.resolve(config.backend, device), windows=windows, batch_size=config.batch_size)
    saliency, calibration = learn_in_memory(job, model, config)
    weights = {m.name: weight_of(model, m).detach().to(device) for m in matrices if m.name in plan}
    cut = MaskCutter(saliency.z, plan, config.mask, job.backend, weights=weights)
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


def _checked_inputs(model: nn.Module, calibration_batches, batch_size: int):
    """(windows, the model's matrices) once the windows' ids and every matrix's weights are checked."""
    windows = _as_windows(calibration_batches)
    check_window_ids(windows, int(getattr(model.config, "vocab_size", 0) or 0))
    Calibration(nsamples=int(windows.shape[0])).steps(batch_size)
    matrices = model_matrices(model)
    for m in matrices:
        check_weight("model", m.name, weight_of(model, m))
        check_finite(m.name, weight_of(model, m), "model")
    return windows, matrices


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the dropped entries of the model's prunable matrices in place (+0.0 zeros). Keys are the
    matrices' logical names (models.Matrix: parameter names, with [part]/[expert] for fused and MoE)."""
    check_api(model=(model, nn.Module))
    views = {m.name: weight_of(model, m) for m in model_matrices(model)}
    check_masks(views, masks)  # every mask, before any weight changes
    for name, keep in masks.items():
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


def _pass_steps(config: PruneConfig | MaskConfig) -> PassSteps:
    """What the pass over the pruned blocks does (pipeline/reconstruct.py): refine the masks, sweep, or both."""
    return PassSteps(ObsSettings(config.percdamp, config.blocksize, config.true_sequential, config.diag_damp),
                     sweep=config.reconstruct == "obs", refine_iters=config.refine_iters)


def _second_pass(config: PruneConfig | MaskConfig) -> str | None:
    """The option that makes the job run the pass over the pruned blocks (the OBS update, the refinement), or
    None."""
    if config.reconstruct == "obs":
        return "`reconstruct` obs"
    return "`refine` swaps" if config.refine != "none" else None


def _open(model_dir: str, spec: MaskSpec, targeting: Targeting, trust_remote_code: bool,
          second_pass: str | None) -> _Source:
    """The model directory opened; `second_pass` (the option asking for the pass over the pruned blocks, or None)
    needs matrices that are whole linears."""
    check_api({"model_dir": model_dir}, spec=(spec, MaskSpec), targeting=(targeting, Targeting))
    config = load_config(model_dir, trust_remote_code)
    checkpoint = LazyCheckpoint(model_dir, config)
    plan, skipped = targeting.plan(checkpoint.matrices, num_blocks(config), spec)
    check_plan(checkpoint.shapes(), plan)
    family = family_for(config)
    if second_pass and (family.sequential is None or not all(m.plain for m in checkpoint.matrices
                                                                if m.name in plan)):
        supported = sorted(t for f in FAMILIES if f.sequential is not None for t in f.model_types)
        raise UsageError(f"{second_pass} supports models whose prunable matrices are whole linears "
                         f"({', '.join(supported)}); {config.model_type} has fused or expert matrices")
    return _Source(model_dir, config, checkpoint, plan, skipped)


def _job(source: _Source, compute: PruneConfig | MaskConfig, device: torch.device, run: RunOptions) -> Job:
    """The job resolved once from the options: the backend and the compute dtype on `device`, where
    activations live and who hears of the progress (its windows come later, once drawn)."""
    return Job(checkpoint=source.checkpoint, plan=source.plan, skipped=source.skipped, device=device,
               dtype=resolve_dtype(compute.dtype, source.config, device),
               backend=backends.resolve(compute.backend, device), batch_size=compute.batch_size,
               offload=run.offload, progress=run.progress, trust_remote_code=run.trust_remote_code)


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


def _run_key(source: _Source, job: Job, config: PruneConfig, windows_sha: str, targeting: Targeting) -> str:
    """A hash of everything that decides a prune's output: it names the run's partial directory."""
    return hashlib.sha256(json.dumps({
        "source": source.checkpoint.content_sha256(), "fingerprint": fingerprint(source.config,
                                                                                 source.checkpoint.shapes()),
        "version": __version__, "windows": windows_sha, "config": config.to_dict(), "device": job.device.type,
        "backend": job.backend, "targeting": targeting.to_dict(),
    }, sort_keys=True).encode()).hexdigest()


def _unshared(config: PruneConfig | MaskConfig) -> str | None:
    """Why a job does not share its work out under torchrun (None: it does)."""
    if getattr(config, "feedback", "none") == "full":
        return "`feedback` full runs in one process"
    if config.refine != "none":
        return "`refine` swaps runs in one process"
    return None if config.reconstruct == "obs" or isinstance(config, PruneConfig) else \
        "mask without `reconstruct` obs"


def _check_processes(batch_size: int, unshared: str | None = None) -> None:
    """Under torchrun, before any work: a job that shares its work (`unshared` says why one does not), each
    step's windows split evenly over the processes. Every process finds the same: rank 0 alone says it."""
    processes = distributed.world()[1]
    if processes > 1 and unshared:
        raise distributed.said_by_rank_0(UsageError(f"{processes} processes: {unshared}; run it in one process"))
    if processes > 1 and batch_size % processes:
        raise distributed.said_by_rank_0(UsageError(
            f"{processes} processes: `batch_size` {batch_size} must be a multiple of the process count (each step's "
            "windows are split evenly among them)"))


def _check_same_source(source: _Source, device: torch.device) -> None:
    """Every process computes on the weights rank 0 computes on (each node hashes its copy, one process per node
    reading the files, the others its cached digests)."""
    distributed.check_same("model_dir", distributed.node_first(source.checkpoint.content_sha256), device)


def prune_checkpoint(model_dir: str, out: str, config: PruneConfig, calibration: Calibration | None = None,
                     run: RunOptions | None = None, targeting: Targeting | None = None) -> Report:
    """`unipruning prune`: calibrate on `calibration`, write the pruned checkpoint, saliency and report to
    `out`. With run.dry_run, return the plan (pipeline/planning.py) and write nothing."""
    start, targeting = time.perf_counter(), targeting or Targeting()
    calibration, run = or_default(calibration=(calibration, Calibration), run=(run, RunOptions))
    check_api({"out": out}, config=(config, PruneConfig))
    config = replace(config, mask=targeting.settle(config.mask))
    source = _open(model_dir, config.mask, targeting, run.trust_remote_code, _second_pass(config))
    calibration = calibration.with_defaults(DEFAULT_NSAMPLES, default_seqlen(source.config.to_dict()))
    calibration.steps(config.batch_size)
    sources = _inputs(model_dir, calibration, targeting)
    device = distributed.init_from_env(resolve_device(config.device))
    preflight(out, run.overwrite, sources, lock=distributed.is_main())  # rank 0 takes the lock, soon
    job = _job(source, config, device, run)
    _check_processes(config.batch_size, _unshared(config))
    if config.feedback == "full":
        from .pipeline.feedback import check_fits

        check_fits(source.checkpoint, job.dtype, device)
    windows, calib_entry = _windows(source, calibration, config.seed)
    job = replace(job, windows=windows)
    if run.dry_run:  # every check of the real run has passed: the plan, nothing written
        from .pipeline.planning import dry_run_plan

        return dry_run_plan(job, config, calibration)
    _check_same_source(source, device)
    distributed.check_same("calib", calib_entry["windows_sha256"], device)  # the windows every process draws
    run_key = _run_key(source, job, config, calib_entry["windows_sha256"], targeting)
    if distributed.world()[0] != 0:  # a worker: its share of every step and of the OBS pass, nothing written
        return _prune_worker(replace(job, progress=None), config, partial_directory(out, run_key))
    report = Report(command="prune", model=os.path.abspath(model_dir), targeting=targeting.to_dict(),
                    settings={**config.to_dict(), "backend_used": job.backend, "device_used": str(device)},
                    calibration=calib_entry, processes=distributed.world()[1])
    with writing(out, run.overwrite, sources, run_key) as staging:
        return _prune_into(staging, job, config, report, start)


def _prune_worker(job: Job, config: PruneConfig, partial: str) -> Report:
    """A worker's part of a prune: its share of the calibration, then of the OBS pass. It reads nothing rank 0
    wrote (rank 0 tells it which blocks are done: it may run on another node) and writes nothing."""
    distributed.barrier()  # rank 0 holds the lock and has made the partial directory
    if config.has_saliency:
        calibrate(job, job.skeleton(), config, keep=False)
    if config.reconstruct == "obs":
        reconstruct(job, job.skeleton(), decided_by_rank_0 if config.has_saliency else None, _pass_steps(config),
                    os.path.join(partial, RECON_STATE))
    rank, processes = distributed.world()
    return Report(command="prune", rank=rank, processes=processes)


def _prune_into(staging: str, job: Job, config: PruneConfig, report: Report, start: float) -> Report:
    """The prune job inside its (resumable) staging directory: calibrate, reconstruct, export."""
    state_dir = os.path.join(staging, BLOCK_STATE)
    os.makedirs(state_dir, exist_ok=True)
    distributed.barrier()  # the workers may now look for finished blocks in it
    writer = pruned_writer(job, staging)
    # masks that need no other block's saliency: each block's weights are written as it finishes
    streamed = (config.feedback == "none" and not _second_pass(config) and config.has_saliency
                and not config.mask.cross_block)
    report.weights_written = "per block during calibration" if streamed else "after calibration"
    on_block = streamed_writes(job, writer, config.mask) if streamed else None
    saliency = learn_from_checkpoint(job, config, state_dir, on_block, report)
    if saliency is not None:
        report.calibration_seconds = time.perf_counter() - start
    cut = None if saliency is None else saliency_cutter(job, saliency, config.mask)
    note_allocation(report, cut, config.mask)
    pruned, recon_dir = (None if cut is None else masked_by(cut)), None
    if _second_pass(config):
        recon_dir, pruned = _reconstruction(job, staging, cut, config, report)
    report = export_checkpoint(job, staging, writer, pruned, saliency, config.mask, report)
    return finish(staging, report, start, state_dir, recon_dir)


def _reconstruction(job: Job, staging: str, cut: MaskCutter | None, compute: PruneConfig | MaskConfig,
                    report: Report) -> tuple[str, Pruned]:
    """The pass over the pruned blocks of a job into `staging` (the refinement, the OBS update), recorded in
    `report`: (its state directory, the pruned weights)."""
    steps = _pass_steps(compute)
    recon_dir, reconstruction, refinement = reconstruct_pass(
        job, staging, obs_choice(cut, compute.guide_alpha, job.backend), steps)
    if reconstruction is not None:
        report.reconstruction = {**reconstruction, "rule": obs_rule(cut, compute.guide_alpha)}
    if refinement is not None:
        report.refinement = refinement
    return recon_dir, reconstructed_weights(recon_dir)


def mask_checkpoint(model_dir: str, saliency_dir: str, out: str, config: MaskConfig | None = None,
                    calibration: Calibration | None = None, run: RunOptions | None = None,
                    targeting: Targeting | None = None) -> Report:
    """`unipruning mask`: new masks (config.mask) from a saved saliency, no calibration; with config.reconstruct
    "obs" the kept weights are reconstructed on `calibration` (nsamples, seqlen, seed default to the
    saliency's)."""
    start, targeting = time.perf_counter(), targeting or Targeting()
    config, run = or_default(config=(config, MaskConfig), run=(run, RunOptions))
    check_api({"saliency_dir": saliency_dir, "out": out}, calibration=(calibration, Calibration, True))
    spec = targeting.settle(config.mask)
    source = _open(model_dir, spec, targeting, run.trust_remote_code, _second_pass(config))
    if _second_pass(config) and calibration is None:
        raise UsageError(f"{_second_pass(config)}: pass `calib` (the windows are run through the pruned model)")
    sources = _inputs(model_dir, calibration, targeting, saliency_dir)
    device = distributed.init_from_env(resolve_device(config.device))
    preflight(out, run.overwrite, sources, lock=distributed.is_main())
    _check_processes(config.batch_size, _unshared(config))
    _check_same_source(source, device)
    job = _job(source, config, device, run)
    saliency = _saliency(source, saliency_dir)
    report = Report(command="mask", model=os.path.abspath(model_dir), saliency=os.path.abspath(saliency_dir),
                    settings={**saliency.metadata, "reconstruct": config.reconstruct, "guide_alpha": config.guide_alpha,
                              **refine_settings(config.refine, config.refine_iters),
                              "backend_used": job.backend, "device_used": str(job.device)},
                    targeting=targeting.to_dict())
    if _second_pass(config):
        job = replace(job, windows=_saliency_windows(source, saliency, calibration, config.batch_size, report))
        distributed.check_same("calib", report.calibration["windows_sha256"], device)
    if distributed.world()[0] != 0:  # a worker: its share of the OBS pass, nothing written
        reconstruct(replace(job, progress=None), job.skeleton(), decided_by_rank_0, _pass_steps(config), "")
        return Report(command="mask", rank=distributed.world()[0], processes=distributed.world()[1])
    if distributed.world()[1] > 1:
        report.processes = distributed.world()[1]
    report.open_seconds = time.perf_counter() - start
    with writing(out, run.overwrite, sources) as staging:
        return _mask_into(staging, job, config, saliency, spec, report, start)


def _mask_into(staging: str, job: Job, config: MaskConfig, saliency: Saliency, spec: MaskSpec, report: Report,
               start: float) -> Report:
    """The mask job inside its staging directory: cut, reconstruct (if asked), export."""
    cut = saliency_cutter(job, saliency, spec)
    note_allocation(report, cut, spec)
    pruned, recon_dir = masked_by(cut), None
    if job.windows is not None:
        recon_dir, pruned = _reconstruction(job, staging, cut, config, report)
    writer = pruned_writer(job, staging)
    report = export_checkpoint(job, staging, writer, pruned, saliency, spec, report)
    report.cut_seconds = time.perf_counter() - start - report.open_seconds
    return finish(staging, report, start, recon_dir)


def _saliency(source: _Source, saliency_dir: str) -> Saliency:
    """The saved saliency of the source's weights (its fingerprint and content checked)."""
    shapes = source.checkpoint.shapes()
    saliency = Saliency.load(saliency_dir, expect_fingerprint=fingerprint(source.config, shapes),
                             expect_source=source.checkpoint.content_sha256())
    if saliency.shapes != shapes:
        raise UsageError("`saliency_dir`: its matrices do not match the model's prunable matrices")
    return saliency


def _saliency_windows(source: _Source, saliency: Saliency, calibration: Calibration, batch_size: int,
                      report: Report) -> torch.Tensor:
    """The windows of a mask job's OBS pass: nsamples, seqlen and seed left None take the saliency's."""
    meta = saliency.metadata
    calibration = calibration.with_defaults(meta["nsamples"], meta["seqlen"], meta["seed"])
    calibration.steps(batch_size)
    windows, report.calibration = _windows(source, calibration, calibration.seed)
    report.calibration["seed"] = calibration.seed
    return windows


__all__ = ["PruneResult", "apply_masks", "mask_checkpoint", "prune", "prune_checkpoint"]

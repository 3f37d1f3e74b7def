"""The three jobs, in memory and on checkpoint directories: prune, mask, (eval lives in evaluate.py).

In memory: `prune(model, calibration_batches, config)` -> PruneResult(saliency, masks, report); the
model is not modified (`apply_masks` does that). On directories: `prune_checkpoint` and
`mask_checkpoint` write a pruned checkpoint through the same `export_checkpoint`, so `mask` from a
saved saliency is bit-identical to `prune` with the same settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from . import __version__, backends, distributed
from .config import RECONSTRUCTIONS, MaskSpec, PruneConfig
from .data import calibration_windows, windows_hash
from .errors import UsageError
from .export import (
    PrunedWriter,
    check_out,
    copy_side_files,
    count_parameters,
    git_hash,
    partial_directory,
    peak_memory,
    resumable_directory,
    staged_directory,
    summarize,
    versions,
    write_json,
)
from .masks import global_counts, mask_stats, masked, matrix_mask
from .models import (
    FAMILIES,
    NEVER_PRUNED,
    Matrix,
    check_nm_divisible,
    family_for,
    fingerprint,
    load_config,
    load_model,
    model_matrices,
    num_blocks,
    resolve_device,
    resolve_dtype,
    weight_of,
)
from .reconstruct import BLOCKSIZE, DAMP, reconstruct, reconstructed, reconstructed_files
from .saliency import Saliency, calibrate
from .stream import LazyCheckpoint
from .targeting import Targeting

log = logging.getLogger("unipruning")

REPORT = "pruning_report.json"
SALIENCY_DIR = "saliency"
BLOCK_STATE = ".blocks"  # per-block saliency of a run in progress, inside its partial directory
RECON_STATE = ".recon"  # per-block reconstructed weights of a run in progress


@dataclass
class PruneResult:
    saliency: Saliency
    masks: dict[str, torch.Tensor]
    report: dict


def _as_windows(calibration_batches: torch.Tensor | Iterable[torch.Tensor]) -> torch.Tensor:
    if isinstance(calibration_batches, torch.Tensor):
        windows = calibration_batches
    else:
        windows = torch.cat([torch.as_tensor(b).reshape(-1, torch.as_tensor(b).shape[-1]) for b in calibration_batches])
    if windows.dim() != 2 or windows.dtype not in (torch.int32, torch.int64):
        raise UsageError("calibration_batches: expected token ids of shape (nsamples, seqlen)")
    return windows.to(torch.int64)


def prune(
    model: nn.Module,
    calibration_batches: torch.Tensor | Iterable[torch.Tensor],
    config: PruneConfig | None = None,
    targeting: Targeting | None = None,
) -> PruneResult:
    """Learn the saliency of `model` on token windows and cut the masks of `config.mask`.

    calibration_batches: (nsamples, seqlen) token ids, or an iterable of (B, seqlen) tensors (joined,
    then split into steps of `config.batch_size` windows). The model's weights are left untouched
    (feedback "full" fine-tunes a copy of the trajectory in place and restores them). `masks` is keyed by
    the matrices' logical names (models.Matrix); targeting (targeting.py) restricts what is masked.
    """
    config = config or PruneConfig()
    if config.reconstruct != "none" or config.metric == "sparsegpt":
        raise UsageError("prune(): weight reconstruction changes weights and runs on checkpoints: use "
                         "prune_checkpoint(model_dir, out, config, calib)")
    windows = _as_windows(calibration_batches)
    matrices = model_matrices(model)
    plan, skipped = (targeting or Targeting()).plan(matrices, num_blocks(model.config), config.mask)
    _check_plan(matrices, plan)
    start = time.perf_counter()
    device = resolve_device(config.device)
    saliency, calibration = _calibrate(model, windows, config, device)
    backend = backends.resolve(config.backend, device)
    weights = {m.name: weight_of(model, m).detach().to(device) for m in matrices if m.name in plan}
    masks = _masks(saliency, weights, plan, config.mask, backend)
    stats = {name: mask_stats(keep, plan[name].nm) for name, keep in masks.items()}
    dense = sum(p.numel() for p in model.parameters())
    report = {
        "settings": config.to_dict(),
        "matrices": stats,
        "total": summarize(stats, dense),
        "targeting": {**(targeting or Targeting()).to_dict(), "skipped": skipped},
        "feedback" if config.feedback == "full" else "blocks": calibration,
        "wall_seconds": time.perf_counter() - start,
        "calibration": {"windows_sha256": windows_hash(windows), "shape": list(windows.shape)},
    }
    return PruneResult(saliency=saliency, masks=masks, report=report)


def _calibrate(model, windows, config: PruneConfig, device):
    """(saliency, per-block timings or the feedback report) of an in-memory model."""
    if config.feedback == "full":
        from .feedback import calibrate_full

        return calibrate_full(model, windows, config, device)
    return calibrate(model, windows, config, device)


def _masks(saliency: Saliency, weights: dict, plan: dict[str, MaskSpec], spec: MaskSpec, backend) -> dict:
    """{name: keep mask on the CPU} for the planned matrices (global: one budget over them all)."""
    counts = {}
    if spec.allocation == "global":
        counts = global_counts(saliency, weights, spec, backend, names=sorted(plan))
    return {name: matrix_mask(saliency.z[name], weights[name], plan[name], counts.get(name), backend).cpu()
            for name in plan}


def pruned_writer(checkpoint: LazyCheckpoint, staging: str, plan: dict[str, MaskSpec]) -> PrunedWriter:
    """The writer of the pruned weights of the planned matrices (one shard per block, export.py)."""
    chosen = [m for m in checkpoint.matrices if m.name in plan]
    return PrunedWriter(checkpoint, staging, chosen, {n: s.nm for n, s in plan.items()})


def _streamed_writes(writer: PrunedWriter, plan: dict[str, MaskSpec], backend: str, device: torch.device):
    """on_block(index, z) for `calibrate`: write block `index`'s pruned shard from its saliency as soon
    as the block is calibrated (masks per matrix or per row, or N:M, need nothing from later blocks)."""

    def on_block(index: int, z) -> None:
        if writer.block_written(index):  # a resumed run: written before the kill
            return

        def pruned(name: str, weight: torch.Tensor):
            keep = matrix_mask(z[name].to(device), weight.to(device), plan[name], None, backend).cpu()
            return masked(weight, keep), keep

        writer.write_block(index, pruned)

    return on_block


def _check_plan(matrices: list[Matrix], plan: dict[str, MaskSpec]) -> None:
    for m in matrices:
        if m.name in plan and plan[m.name].nm is not None:
            check_nm_divisible({m.name: m.shape}, plan[m.name].nm[1])


# ------------------------------------------------------------------------------ checkpoint jobs
def sparsity_config(spec: MaskSpec, plan: dict[str, MaskSpec], skipped: dict[str, str], metric: str = "unipruning",
                    reconstruct: str = "none") -> dict:
    """The `sparsity_config` entry of the pruned config.json."""
    return {
        "format": "dense",
        "method": "sparsegpt" if metric == "sparsegpt" else "unipruning",
        "reconstruct": reconstruct,
        "pattern": spec.pattern,
        "sparsity_structure": spec.pattern,
        "sparsity": spec.sparsity,
        "allocation": spec.allocation,
        "targets": list(plan),
        "ignore": [*NEVER_PRUNED, *skipped],
        "overrides": {name: {"sparsity": s.sparsity, "pattern": s.pattern} for name, s in plan.items() if s != spec},
    }


def keep_function(
    checkpoint: LazyCheckpoint, saliency: Saliency, plan: dict[str, MaskSpec], spec: MaskSpec, backend: str,
    device: torch.device,
) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """keep(name, stored weight) -> the saliency's mask of that matrix (on `device`) under its planned
    spec; with allocation global the per-matrix counts are settled first, over every planned matrix."""
    counts = {}
    if spec.allocation == "global":  # one matrix in memory at a time (masks.global_counts)
        names = sorted(plan)
        numels = {m.name: math.prod(m.shape) for m in checkpoint.matrices}
        counts = global_counts(saliency, checkpoint.lazy(names), spec, backend, numels, device, names=names)

    def keep(name: str, weight: torch.Tensor) -> torch.Tensor:
        return matrix_mask(saliency.z[name].to(device), weight.to(device), plan[name], counts.get(name), backend)

    return keep


def export_checkpoint(
    checkpoint: LazyCheckpoint,
    staging: str,
    plan: dict[str, MaskSpec],
    skipped: dict[str, str],
    saliency: Saliency | None,
    spec: MaskSpec,
    backend: str,
    device: torch.device,
    report: dict,
    recon_dir: str | None = None,
    writer: PrunedWriter | None = None,
) -> dict:
    """Write weights, side files, saliency (when there is one) and report into `staging`; return the
    report. The weights are the saliency's masks applied to the source (computed on `device` with
    `backend`: every backend gives the same masks), or, with `recon_dir`, the reconstructed ones."""
    if recon_dir is not None:
        files = reconstructed_files(recon_dir)

        def pruned(name: str, weight: torch.Tensor):
            return reconstructed(files[name], name)
    else:
        keep = keep_function(checkpoint, saliency, plan, spec, backend, device)

        def pruned(name: str, weight: torch.Tensor):
            mask = keep(name, weight).cpu()
            return masked(weight, mask), mask

    model_dir = checkpoint.model_dir
    matrices = (writer or pruned_writer(checkpoint, staging, plan)).finish(pruned)
    settings = report.get("settings", {})
    copy_side_files(model_dir, staging, sparsity_config(spec, plan, skipped, settings.get("metric", ""),
                                                        settings.get("reconstruct", "none")))
    if saliency is not None:
        saliency.save(os.path.join(staging, SALIENCY_DIR))
    report = {
        **report,
        "mask": {"sparsity": spec.sparsity, "pattern": spec.pattern, "allocation": spec.allocation,
                 "bounds": list(spec.bounds)},
        "matrices": matrices,
        "skipped": skipped,
        "total": summarize(matrices, count_parameters(model_dir)),
        "peak_memory": peak_memory(),
        "versions": versions(),
        "git_hash": git_hash(),
    }
    write_json(os.path.join(staging, REPORT), report)
    return report


def _checked_model_dir(model_dir: str, spec: MaskSpec, targeting: Targeting | None, trust_remote_code: bool = False):
    """(config, checkpoint, plan, skipped, shapes) of a model directory, or a one-line error."""
    config = load_config(model_dir, trust_remote_code)
    checkpoint = LazyCheckpoint(model_dir, config)
    plan, skipped = (targeting or Targeting()).plan(checkpoint.matrices, num_blocks(config), spec)
    _check_plan(checkpoint.matrices, plan)
    return config, checkpoint, plan, skipped, {m.name: m.shape for m in checkpoint.matrices}


def _check_reconstructable(config, checkpoint: LazyCheckpoint, plan: dict[str, MaskSpec]) -> None:
    family = family_for(config)
    if family.sequential is None or not all(m.plain for m in checkpoint.matrices if m.name in plan):
        supported = sorted(t for f in FAMILIES if f.sequential is not None for t in f.model_types)
        raise UsageError(f"--reconstruct obs supports models whose prunable matrices are whole linears "
                         f"({', '.join(supported)}); {config.model_type} has fused or expert matrices")


def _reconstruct_pass(
    staging: str, checkpoint: LazyCheckpoint, windows: torch.Tensor, batch_size: int, device: torch.device,
    dtype: torch.dtype, plan: dict[str, MaskSpec], keep: Callable | None, backend: str, progress=None,
    offload: str = "auto",
) -> tuple[str, dict]:
    """Run the OBS reconstruction (reconstruct.py) into `staging`; (its state directory, report entry)."""
    start = time.perf_counter()
    recon_dir = os.path.join(staging, RECON_STATE)
    os.makedirs(recon_dir, exist_ok=True)
    model = checkpoint.skeleton(dtype)
    blocks = reconstruct(model, windows, batch_size, device, checkpoint, recon_dir, plan, keep, backend, progress,
                         offload)
    groups = len(family_for(checkpoint.config).sequential)
    return recon_dir, {
        "method": "obs", "damp": DAMP, "blocksize": BLOCKSIZE, "seconds": time.perf_counter() - start,
        "blocks": blocks,
        "cost": f"a second forward per layer on the pruned stream ({groups} partial forwards to collect each "
                "group's Hessian, then one for the block's output), beside the calibration's own",
    }


def prune_checkpoint(
    model_dir: str,
    out: str,
    config: PruneConfig,
    calib: str,
    nsamples: int = 128,
    seqlen: int = 2048,
    overwrite: bool = False,
    tokenizer_dir: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    offload: str = "auto",
    targeting: Targeting | None = None,
    trust_remote_code: bool = False,
    dry_run: bool = False,
) -> dict:
    """`unipruning prune`: calibrate on `calib`, write the pruned checkpoint, saliency and report.
    offload: where activations live between blocks, 'auto', 'always' (pinned CPU memory), 'never'.
    targeting: which matrices are cut (targeting.py). dry_run: return the plan (planning.py), write nothing."""
    start = time.perf_counter()
    model_cfg, checkpoint, plan, skipped, shapes = _checked_model_dir(model_dir, config.mask, targeting,
                                                                      trust_remote_code)
    targeting = targeting or Targeting()
    if nsamples < 1 or nsamples % config.batch_size:
        raise UsageError(f"--batch-size {config.batch_size} must divide --nsamples {nsamples}")
    if config.reconstruct == "obs":
        _check_reconstructable(model_cfg, checkpoint, plan)
    device = distributed.init_from_env(resolve_device(config.device))
    backend = backends.resolve(config.backend, device)
    dtype = resolve_dtype(config.dtype, model_cfg, device)
    if dry_run:
        from .planning import dry_run_plan

        return dry_run_plan(checkpoint, plan, skipped, config, nsamples, seqlen, device, dtype)
    check_out(out, overwrite, {"--model": model_dir})
    rank, processes = distributed.world()
    if processes > 1 and (config.batch_size % processes or config.metric == "sparsegpt"
                          or config.feedback == "full"):
        raise UsageError(f"{processes} processes: --batch-size must be a multiple of the process count and "
                         "the saliency must be layer-streamed (not --metric sparsegpt, not --feedback full)")
    if config.feedback == "full":
        from .feedback import check_fits

        check_fits(checkpoint, dtype, device)
    tokenizer = load_tokenizer(tokenizer_dir or model_dir)
    windows = calibration_windows(tokenizer, calib, nsamples, seqlen, config.seed)
    windows_sha = windows_hash(windows)
    run_key = hashlib.sha256(json.dumps({
        "model": os.path.realpath(model_dir), "fingerprint": fingerprint(model_cfg, shapes), "version": __version__,
        "windows": windows_sha, "config": config.to_dict(), "device": device.type, "backend": backend,
        "targeting": targeting.to_dict(),
    }, sort_keys=True).encode()).hexdigest()
    report = {
        "command": "prune",
        "model": os.path.abspath(model_dir),
        "settings": {**config.to_dict(), "backend_used": backend, "device_used": str(device)},
        "targeting": targeting.to_dict(),
        "calibration": {"source": calib, "nsamples": nsamples, "seqlen": seqlen, "windows_sha256": windows_sha},
    }
    if rank != 0:  # a data-parallel worker: its share of every step, nothing written (see distributed.py)
        state_dir = os.path.join(partial_directory(out, run_key), BLOCK_STATE)
        distributed.barrier()  # rank 0 has kept (or, with --overwrite, discarded) the partial state
        calibrate(checkpoint.skeleton(dtype), windows, config, device, None, checkpoint,
                  state_dir if os.path.isdir(state_dir) else None, offload)
        return {"command": "prune", "rank": rank, "processes": processes}
    report["processes"] = processes
    # the partial state lives next to --out, named by the run: the same command resumes after the last
    # finished block (a killed run included); --overwrite discards it
    with resumable_directory(out, run_key, overwrite) as staging:
        state_dir = os.path.join(staging, BLOCK_STATE)
        os.makedirs(state_dir, exist_ok=True)
        distributed.barrier()  # the workers may now look for finished blocks in it
        saliency, keep, recon_dir = None, None, None
        writer = pruned_writer(checkpoint, staging, plan)
        # masks that need no other block's saliency: each block's weights are written as it finishes
        streamed = (config.feedback == "none" and config.reconstruct == "none" and config.metric != "sparsegpt"
                    and config.mask.allocation != "global")
        report["weights_written"] = "per block during calibration" if streamed else "after calibration"
        on_block = _streamed_writes(writer, plan, backend, device) if streamed else None
        if config.feedback == "full":  # the whole model, fine-tuned along the way; the output keeps the source
            from .feedback import calibrate_full

            saliency, report["feedback"] = calibrate_full(load_model(model_dir, dtype, trust_remote_code), windows,
                                                          config, device, restore=False)
            report["calibration_seconds"] = time.perf_counter() - start
        elif config.metric != "sparsegpt":  # sparsegpt: no saliency, its masks come from the OBS sweep
            # never the whole model: a meta-device skeleton, each block read from the shards in its turn
            model = checkpoint.skeleton(dtype)
            saliency, report["blocks"] = calibrate(model, windows, config, device, progress, checkpoint, state_dir,
                                                   offload, on_block)
            del model
            report["calibration_seconds"] = time.perf_counter() - start
        if saliency is not None and saliency.metadata.get("unseen"):
            report["unseen_matrices"] = {
                "matrices": saliency.metadata["unseen"],
                "policy": "their input saw no calibration token (experts never routed to): z stays 0 and their "
                          "masks are cut by |W|, the ranking's second key",
            }
        if config.reconstruct == "obs":
            if saliency is not None:
                keep = keep_function(checkpoint, saliency, plan, config.mask, backend, device)
            recon_dir, report["reconstruction"] = _reconstruct_pass(
                staging, checkpoint, windows, config.batch_size, device, dtype, plan, keep, backend, progress,
                offload)
        report = export_checkpoint(checkpoint, staging, plan, skipped, saliency, config.mask, backend, device,
                                   report, recon_dir, writer)
        report["wall_seconds"] = time.perf_counter() - start
        write_json(os.path.join(staging, REPORT), report)
        for partial in (state_dir, recon_dir):
            if partial is not None:
                shutil.rmtree(partial)
    return report


def mask_checkpoint(
    model_dir: str, saliency_dir: str, out: str, spec: MaskSpec, overwrite: bool = False,
    backend: str = "auto", device: str = "auto", reconstruct: str = "none", calib: str | None = None,
    nsamples: int | None = None, seqlen: int | None = None, seed: int | None = None, batch_size: int = 1,
    dtype: str = "auto", tokenizer_dir: str | None = None, progress: Callable[[int, int], None] | None = None,
    offload: str = "auto", targeting: Targeting | None = None, trust_remote_code: bool = False,
) -> dict:
    """`unipruning mask`: new masks from a saved saliency, no calibration; with reconstruct "obs" the
    kept weights are reconstructed on `calib` (windows as in the saliency's run unless given)."""
    start = time.perf_counter()
    config, checkpoint, plan, skipped, shapes = _checked_model_dir(model_dir, spec, targeting, trust_remote_code)
    names = list(shapes)
    if reconstruct not in RECONSTRUCTIONS:
        raise UsageError(f"--reconstruct: expected one of {', '.join(RECONSTRUCTIONS)}, got {reconstruct!r}")
    if reconstruct == "obs" and not calib:
        raise UsageError("--reconstruct obs: pass --calib (the windows are run through the pruned model)")
    if reconstruct == "obs":
        _check_reconstructable(config, checkpoint, plan)
    check_out(out, overwrite, {"--model": model_dir, "--saliency": saliency_dir})
    compute = resolve_device(device)
    used = backends.resolve(backend, compute)
    saliency = Saliency.load(saliency_dir, expect_fingerprint=fingerprint(config, shapes))
    if set(saliency.z) != set(names):
        raise UsageError("--saliency: its matrices do not match the model's prunable matrices")
    report = {
        "command": "mask",
        "model": os.path.abspath(model_dir),
        "saliency": os.path.abspath(saliency_dir),
        "settings": {**saliency.metadata, "reconstruct": reconstruct, "backend_used": used,
                     "device_used": str(compute)},
        "targeting": (targeting or Targeting()).to_dict(),
    }
    windows = None
    if reconstruct == "obs":
        meta = saliency.metadata
        nsamples, seqlen = nsamples or meta["nsamples"], seqlen or meta["seqlen"]
        seed = meta["seed"] if seed is None else seed
        if nsamples % batch_size:
            raise UsageError(f"--batch-size {batch_size} must divide --nsamples {nsamples}")
        windows = calibration_windows(load_tokenizer(tokenizer_dir or model_dir), calib, nsamples, seqlen, seed)
        report["calibration"] = {"source": calib, "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
                                 "windows_sha256": windows_hash(windows)}
    with staged_directory(out) as staging:
        recon_dir = None
        if windows is not None:
            keep = keep_function(checkpoint, saliency, plan, spec, used, compute)
            recon_dir, report["reconstruction"] = _reconstruct_pass(
                staging, checkpoint, windows, batch_size, compute, resolve_dtype(dtype, config, compute),
                plan, keep, used, progress, offload)
        report = export_checkpoint(checkpoint, staging, plan, skipped, saliency, spec, used, compute, report,
                                   recon_dir)
        report["wall_seconds"] = time.perf_counter() - start
        write_json(os.path.join(staging, REPORT), report)
        if recon_dir is not None:
            shutil.rmtree(recon_dir)
    return report


def load_tokenizer(directory: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as exc:  # noqa: BLE001 - missing or unreadable tokenizer files
        raise UsageError(
            f"no usable tokenizer in {directory!r} (pass --tokenizer DIR): {str(exc).splitlines()[0][:200]}"
        ) from exc


__all__ = ["PruneResult", "prune", "prune_checkpoint", "mask_checkpoint"]

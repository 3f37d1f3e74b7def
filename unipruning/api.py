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
    check_out,
    copy_side_files,
    count_parameters,
    git_hash,
    partial_directory,
    peak_memory,
    resumable_directory,
    staged_directory,
    summarize,
    tensor_shapes,
    versions,
    write_json,
    write_pruned_weights,
)
from .masks import global_counts, iter_masks, mask_stats, masked, matrix_mask
from .models import (
    check_nm_divisible,
    family_for,
    fingerprint,
    load_config,
    prunable_names,
    resolve_device,
    resolve_dtype,
)
from .reconstruct import BLOCKSIZE, DAMP, reconstruct, reconstructed, reconstructed_files
from .saliency import Saliency, calibrate
from .stream import LazyCheckpoint

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
) -> PruneResult:
    """Learn the saliency of `model` on token windows and cut the masks of `config.mask`.

    calibration_batches: (nsamples, seqlen) token ids, or an iterable of (B, seqlen) tensors (joined,
    then split into steps of `config.batch_size` windows). The model's weights are left untouched.
    """
    config = config or PruneConfig()
    if config.reconstruct != "none" or config.metric == "sparsegpt":
        raise UsageError("prune(): weight reconstruction changes weights and runs on checkpoints: use "
                         "prune_checkpoint(model_dir, out, config, calib)")
    windows = _as_windows(calibration_batches)
    names = prunable_names(model.config)
    params = dict(model.named_parameters())
    if config.mask.nm is not None:
        check_nm_divisible({n: tuple(params[n].shape) for n in names}, config.mask.nm[1])
    start = time.perf_counter()
    device = resolve_device(config.device)
    saliency, per_block = calibrate(model, windows, config, device)
    backend = backends.resolve(config.backend, device)
    masks = {name: keep.cpu() for name, keep in iter_masks(
        saliency, {n: params[n].detach().to(device) for n in names}, config.mask, backend)}
    matrices = {name: mask_stats(keep, config.mask.nm) for name, keep in masks.items()}
    dense = sum(p.numel() for p in model.parameters())
    report = {
        "settings": config.to_dict(),
        "matrices": matrices,
        "total": summarize(matrices, dense),
        "blocks": per_block,
        "wall_seconds": time.perf_counter() - start,
        "calibration": {"windows_sha256": windows_hash(windows), "shape": list(windows.shape)},
    }
    return PruneResult(saliency=saliency, masks=masks, report=report)


# ------------------------------------------------------------------------------ checkpoint jobs
def sparsity_config(spec: MaskSpec, names: list[str], metric: str = "unipruning", reconstruct: str = "none") -> dict:
    """The `sparsity_config` entry of the pruned config.json."""
    return {
        "format": "dense",
        "method": "sparsegpt" if metric == "sparsegpt" else "unipruning",
        "reconstruct": reconstruct,
        "pattern": spec.pattern,
        "sparsity_structure": spec.pattern,
        "sparsity": spec.sparsity,
        "allocation": spec.allocation,
        "targets": names,
        "ignore": ["lm_head", "embed_tokens", "norm"],
    }


def keep_function(
    model_dir: str, saliency: Saliency, spec: MaskSpec, backend: str, device: torch.device
) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """keep(name, stored weight) -> the saliency's mask of that matrix (on `device`); with allocation
    global the per-matrix counts are settled first, over every matrix."""
    counts = {}
    if spec.allocation == "global":  # one matrix in memory at a time (masks.global_counts)
        names = list(saliency.z)
        stored = LazyCheckpoint(model_dir, load_config(model_dir))
        numels = {n: math.prod(shape) for n, shape in tensor_shapes(model_dir, names).items()}
        counts = global_counts(saliency, stored.lazy(names), spec, backend, numels, device)

    def keep(name: str, weight: torch.Tensor) -> torch.Tensor:
        return matrix_mask(saliency.z[name].to(device), weight.to(device), spec, counts.get(name), backend)

    return keep


def export_checkpoint(
    model_dir: str,
    staging: str,
    names: list[str],
    saliency: Saliency | None,
    spec: MaskSpec,
    backend: str,
    device: torch.device,
    report: dict,
    recon_dir: str | None = None,
) -> dict:
    """Write weights, side files, saliency (when there is one) and report into `staging`; return the
    report. The weights are the saliency's masks applied to the source (computed on `device` with
    `backend`: every backend gives the same masks), or, with `recon_dir`, the reconstructed ones."""
    if recon_dir is not None:
        files = reconstructed_files(recon_dir)

        def pruned(name: str, weight: torch.Tensor):
            return reconstructed(files[name], name)
    else:
        keep = keep_function(model_dir, saliency, spec, backend, device)

        def pruned(name: str, weight: torch.Tensor):
            mask = keep(name, weight).cpu()
            return masked(weight, mask), mask

    matrices = write_pruned_weights(model_dir, staging, pruned, names, spec.nm)
    settings = report.get("settings", {})
    copy_side_files(model_dir, staging, sparsity_config(spec, names, settings.get("metric", ""),
                                                        settings.get("reconstruct", "none")))
    if saliency is not None:
        saliency.save(os.path.join(staging, SALIENCY_DIR))
    report = {
        **report,
        "mask": {"sparsity": spec.sparsity, "pattern": spec.pattern, "allocation": spec.allocation,
                 "bounds": list(spec.bounds)},
        "matrices": matrices,
        "total": summarize(matrices, count_parameters(model_dir)),
        "peak_memory": peak_memory(),
        "versions": versions(),
        "git_hash": git_hash(),
    }
    write_json(os.path.join(staging, REPORT), report)
    return report


def _checked_model_dir(model_dir: str, spec: MaskSpec):
    config = load_config(model_dir)
    names = prunable_names(config)
    shapes = tensor_shapes(model_dir, names)
    if spec.nm is not None:
        check_nm_divisible(shapes, spec.nm[1])
    return config, names, shapes


def _reconstruct_pass(
    staging: str, model_dir: str, model_cfg, windows: torch.Tensor, batch_size: int, device: torch.device,
    dtype: torch.dtype, spec: MaskSpec, keep: Callable | None, backend: str, progress=None, offload: str = "auto",
) -> tuple[str, dict]:
    """Run the OBS reconstruction (reconstruct.py) into `staging`; (its state directory, report entry)."""
    start = time.perf_counter()
    recon_dir = os.path.join(staging, RECON_STATE)
    os.makedirs(recon_dir, exist_ok=True)
    checkpoint = LazyCheckpoint(model_dir, model_cfg)
    model = checkpoint.skeleton(dtype)
    blocks = reconstruct(model, windows, batch_size, device, checkpoint, recon_dir, spec, keep, backend, progress,
                         offload)
    groups = len(family_for(model_cfg).sequential)
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
) -> dict:
    """`unipruning prune`: calibrate on `calib`, write the pruned checkpoint, saliency and report.
    offload: where activations live between blocks, 'auto', 'always' (pinned CPU memory), 'never'."""
    start = time.perf_counter()
    model_cfg, names, shapes = _checked_model_dir(model_dir, config.mask)
    check_out(out, overwrite, {"--model": model_dir})
    if nsamples < 1 or nsamples % config.batch_size:
        raise UsageError(f"--batch-size {config.batch_size} must divide --nsamples {nsamples}")
    device = distributed.init_from_env(resolve_device(config.device))
    backend = backends.resolve(config.backend, device)
    dtype = resolve_dtype(config.dtype, model_cfg, device)
    rank, processes = distributed.world()
    if processes > 1 and (config.batch_size % processes or config.metric == "sparsegpt"):
        raise UsageError(f"{processes} processes: --batch-size must be a multiple of the process count and "
                         "the saliency must be calibrated (--metric sparsegpt has none)")
    tokenizer = load_tokenizer(tokenizer_dir or model_dir)
    windows = calibration_windows(tokenizer, calib, nsamples, seqlen, config.seed)
    windows_sha = windows_hash(windows)
    run_key = hashlib.sha256(json.dumps({
        "model": os.path.realpath(model_dir), "fingerprint": fingerprint(model_cfg, shapes), "version": __version__,
        "windows": windows_sha, "config": config.to_dict(), "device": device.type, "backend": backend,
    }, sort_keys=True).encode()).hexdigest()
    report = {
        "command": "prune",
        "model": os.path.abspath(model_dir),
        "settings": {**config.to_dict(), "backend_used": backend, "device_used": str(device)},
        "calibration": {"source": calib, "nsamples": nsamples, "seqlen": seqlen, "windows_sha256": windows_sha},
    }
    if rank != 0:  # a data-parallel worker: its share of every step, nothing written (see distributed.py)
        checkpoint = LazyCheckpoint(model_dir, model_cfg)
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
        if config.metric != "sparsegpt":  # sparsegpt: no saliency, its masks come from the OBS sweep
            # never the whole model: a meta-device skeleton, each block read from the shards in its turn
            checkpoint = LazyCheckpoint(model_dir, model_cfg)
            model = checkpoint.skeleton(dtype)
            saliency, report["blocks"] = calibrate(model, windows, config, device, progress, checkpoint, state_dir,
                                                   offload)
            del model
            report["calibration_seconds"] = time.perf_counter() - start
        if config.reconstruct == "obs":
            if saliency is not None:
                keep = keep_function(model_dir, saliency, config.mask, backend, device)
            recon_dir, report["reconstruction"] = _reconstruct_pass(
                staging, model_dir, model_cfg, windows, config.batch_size, device, dtype, config.mask, keep,
                backend, progress, offload)
        report = export_checkpoint(model_dir, staging, names, saliency, config.mask, backend, device, report,
                                   recon_dir)
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
    offload: str = "auto",
) -> dict:
    """`unipruning mask`: new masks from a saved saliency, no calibration; with reconstruct "obs" the
    kept weights are reconstructed on `calib` (windows as in the saliency's run unless given)."""
    start = time.perf_counter()
    config, names, shapes = _checked_model_dir(model_dir, spec)
    if reconstruct not in RECONSTRUCTIONS:
        raise UsageError(f"--reconstruct: expected one of {', '.join(RECONSTRUCTIONS)}, got {reconstruct!r}")
    if reconstruct == "obs" and not calib:
        raise UsageError("--reconstruct obs: pass --calib (the windows are run through the pruned model)")
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
            keep = keep_function(model_dir, saliency, spec, used, compute)
            recon_dir, report["reconstruction"] = _reconstruct_pass(
                staging, model_dir, config, windows, batch_size, compute, resolve_dtype(dtype, config, compute),
                spec, keep, used, progress, offload)
        report = export_checkpoint(model_dir, staging, names, saliency, spec, used, compute, report, recon_dir)
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

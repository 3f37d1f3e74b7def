"""The outputs of prune and mask: the pruned checkpoint (its masks cut from the saliency, or its weights
reconstructed), the saliency directory, the side files and the report, written into a staging directory.

The same code serves `prune` and `mask`, so `mask` from a saved saliency writes the bytes `prune` wrote.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Mapping

import torch

from ..algorithm.masks import MaskCutter, masked
from ..algorithm.obs import guide_prior
from ..config import MaskSpec
from ..io.report import REPORT, Report, Totals, git_hash, peak_memory, versions
from ..io.saliency import Saliency
from ..io.staging import write_json
from ..io.writer import PrunedWriter, copy_side_files
from ..models import NEVER_PRUNED, family_for
from .job import Job
from .reconstruct import PassSteps, reconstruct, reconstructed, reconstructed_files

SALIENCY_DIR = "saliency"
RECON_STATE = ".recon"  # per-block reconstructed weights of a run in progress, inside its staging directory

Pruned = Callable[[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # (name, W) -> (pruned W, keep)


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


def pruned_writer(job: Job, staging: str) -> PrunedWriter:
    """The writer of the pruned weights of the job's planned matrices (one shard per block, io/writer.py)."""
    chosen = [m for m in job.checkpoint.matrices if m.name in job.plan]
    return PrunedWriter(job.checkpoint, staging, chosen, {n: s.nm for n, s in job.plan.items()})


def masked_by(cut: Callable[[str, torch.Tensor], torch.Tensor]) -> Pruned:
    """pruned(name, W) from a mask cutter: W with +0.0 at the dropped entries, and the mask (on the CPU)."""

    def pruned(name: str, weight: torch.Tensor):
        keep = cut(name, weight).cpu()
        return masked(weight, keep), keep

    return pruned


OnBlock = Callable[[int, Mapping[str, torch.Tensor]], None]


def streamed_writes(job: Job, writer: PrunedWriter, spec: MaskSpec) -> OnBlock:
    """on_block(index, z) for calibration: write block `index`'s pruned shard from its saliency as soon as
    the block is calibrated (masks per matrix or per row, or N:M, need nothing from later blocks)."""

    def on_block(index: int, z: Mapping[str, torch.Tensor]) -> None:
        if not writer.block_written(index):  # a resumed run wrote it before the kill
            writer.write_block(index, masked_by(MaskCutter(z, job.plan, spec, job.backend, job.device)))

    return on_block


def saliency_cutter(job: Job, saliency: Saliency, spec: MaskSpec) -> MaskCutter:
    """The saliency's masks of the planned matrices, computed on the job's device; with allocation global the
    counts are settled over every planned matrix, reading one matrix at a time from the checkpoint."""
    numels = {m.name: m.shape[0] * m.shape[1] for m in job.checkpoint.matrices}
    return MaskCutter(saliency.z, job.plan, spec, job.backend, job.device, job.checkpoint.lazy(sorted(job.plan)),
                      numels)


def note_allocation(report: Report, cut: MaskCutter | None, spec: MaskSpec) -> None:
    """Record OWL's block sparsities in the report's mask entry (other allocations need no note)."""
    if cut is not None and cut.block_sparsities is not None:
        report.mask = {"owl": {"m": spec.owl_m, "lambda": spec.owl_lambda,
                               "block_sparsity": {str(b): s for b, s in cut.block_sparsities.items()}}}


def obs_choice(cut: MaskCutter | None, guide_alpha: float | None, backend: str) -> Callable | None:
    """What the OBS pass is told of each matrix's mask (pipeline/reconstruct.py): the saliency's mask;
    with `guide_alpha`, no mask but the saliency's rank prior for SparseGPT's rule (and the count of a
    cross-block allocation); None (the sparsegpt metric): SparseGPT's rule alone."""
    if cut is None:
        return None
    if guide_alpha is None:
        return lambda name, weight: (cut(name, weight), None, None)
    return lambda name, weight: (None, guide_prior(cut.z[name], weight, guide_alpha, backend),
                                 cut.counts.get(name))


def obs_rule(cut: MaskCutter | None, guide_alpha: float | None) -> str:
    if cut is None:
        return "sparsegpt: smallest w^2/U_ii^2"
    return "saliency mask" if guide_alpha is None else f"guided: smallest w^2/U_ii^2 * saliency rank^{guide_alpha}"


def reconstruct_pass(job: Job, staging: str, choice: Callable | None, steps: PassSteps) -> tuple[str, dict, dict]:
    """Run the pass over the blocks on the pruned stream (reconstruct.py: the refinement and/or the OBS
    reconstruction) into `staging`; (its state directory, the reconstruction's report entry (None without
    the sweep), the refinement's (None without it)). steps.obs: SparseGPT's dampening and block size by
    default."""
    start = time.perf_counter()
    recon_dir = os.path.join(staging, RECON_STATE)
    os.makedirs(recon_dir, exist_ok=True)
    blocks = reconstruct(job, job.skeleton(), choice, steps, recon_dir)
    refined = {name: e for b in blocks for name, e in b.pop("refinement", {}).items()}
    groups = len(family_for(job.checkpoint.config).sequential)
    seconds = time.perf_counter() - start
    cost = (f"a second forward per layer on the pruned stream ({groups} partial forwards to collect each group's "
            "Hessian, then one for the block's output), beside the calibration's own")
    refinement = None if steps.refine_iters is None else {
        "method": "swaps", "iters": steps.refine_iters, **({} if steps.sweep else {"seconds": seconds, "blocks": blocks,
                                                                                  "cost": cost}),
        "error": "||((1 - M) * W) X||^2 = sum over rows of d H d^T, H = 2/n X^T X of the pruned stream",
        "matrices": refined}
    if not steps.sweep:
        return recon_dir, None, refinement
    obs = steps.obs
    # the order is recorded only when it is not the default, so that default reports stay as they were
    order = {} if obs.true_sequential else {"true_sequential": False}
    order.update({"diag_damp": obs.diag_damp} if obs.diag_damp else {})
    return recon_dir, {"method": "obs", "damp": obs.damp, "blocksize": obs.blocksize, **order, "seconds": seconds,
                       "blocks": blocks, "cost": cost}, refinement


def reconstructed_weights(recon_dir: str) -> Pruned:
    files = reconstructed_files(recon_dir)
    return lambda name, weight: reconstructed(files[name], name, weight)


def export_checkpoint(job: Job, staging: str, writer: PrunedWriter, pruned: Pruned, saliency: Saliency | None,
                      spec: MaskSpec, report: Report) -> Report:
    """Write the weights not written yet (`pruned` gives each planned matrix), the side files, the
    saliency (when there is one) and the report into `staging`; return the report."""
    checkpoint = job.checkpoint
    matrices = writer.finish(pruned)
    settings = report.settings
    copy_side_files(checkpoint.model_dir, staging, sparsity_config(spec, job.plan, job.skipped,
                                                                   settings.get("metric", ""),
                                                                   settings.get("reconstruct", "none")))
    if saliency is not None:
        saliency.save(os.path.join(staging, SALIENCY_DIR))
    report.mask = {"sparsity": spec.sparsity, "pattern": spec.pattern, "allocation": spec.allocation,
                   "bounds": list(spec.bounds), **(report.mask or {})}
    report.matrices, report.skipped = matrices, job.skipped
    report.total = Totals.of(matrices, checkpoint.num_parameters)
    report.peak_memory, report.versions, report.git_hash = peak_memory(), versions(), git_hash()
    write_json(os.path.join(staging, REPORT), report.to_dict())
    return report


def finish(staging: str, report: Report, start: float, *state_dirs: str | None) -> Report:
    """The report with the job's wall time, rewritten; the run's partial state removed."""
    report.wall_seconds = time.perf_counter() - start
    write_json(os.path.join(staging, REPORT), report.to_dict())
    for state in state_dirs:
        if state is not None:
            shutil.rmtree(state)
    return report

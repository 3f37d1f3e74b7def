"""Weight reconstruction after masking (`reconstruct` obs), and SparseGPT's own masks (docs/method.md,
"Reconstruction").

A second pass over the decoder blocks, on the PRUNED activation stream: block by block, and within a
block group by group in compute order (q/k/v, then o, then gate/up, then down: the family's
`sequential` table), collect H = 2/n X^T X of the group's input from the block as reconstructed so
far, then reconstruct each linear of the group with its mask (algorithm/obs.py). (`true_sequential`
off: every group's H from the block before any of it is reconstructed, as llm-compressor does.) The
reconstructed block then produces the next block's input. Each block costs one forward per group plus one for its
output, beside the calibration's own forward; the saliency stays on the dense stream, so `mask` still
re-masks in seconds (but each new mask needs this pass again).

Masks come from `choice(name, weight)` -> (keep, prior, kept): the saliency's mask (UniPruning), or no
mask and SparseGPT's rule applied during the sweep, keeping `kept` entries (or the spec's count), its
score times the saliency's rank prior (Γ-guided) or alone (`choice` None: the `sparsegpt` metric).
Finished blocks are saved atomically in `state_dir` (the reconstructed weights in the checkpoint's
dtype, and the masks), so a killed run resumes after the last finished block with identical bytes.

Every forward runs one window at a time and H is summed lane by lane (weight_parallel.py), so that under
torchrun the matrices are shared out by cost and each process computes the same bits as one process: rank 0
decides the masks (it holds the saliency), the owners sweep, the results reach every process, and rank 0
alone reads and writes `state_dir`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..algorithm.obs import ObsSettings, reconstruct_weight, sweep_rule
from ..io.staging import atomic_file
from ..models import block_matrices, family_for
from . import distributed
from .blocks import for_each_block, open_lanes
from .job import Job
from .weight_parallel import Handover, Hessians, owners, sweep_cost

_STORED = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}  # io.checkpoint.DENSE_DTYPES


def _state_file(state_dir: str, index: int) -> str:
    return os.path.join(state_dir, f"block-{index:05d}.safetensors")


def _saved_block(path: str, names: list[str]) -> dict[str, torch.Tensor] | None:
    """The reconstructed weights of a finished block, or None: absent, or unreadable (what a crash before
    the disk was flushed can leave; removed, and the block reconstructed again)."""
    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework="pt") as handle:
            keys = set(handle.keys())
            if not all(n in keys and f"{n}.keep" in keys for n in names):
                raise KeyError("a matrix is missing")
            return {name: handle.get_tensor(name) for name in names}
    except (SafetensorError, OSError, KeyError, RuntimeError):
        with contextlib.suppress(OSError):
            os.remove(path)
        return None


def _block_linears(model: nn.Module, block: nn.Module, index: int, plan) -> tuple[str, dict[str, nn.Linear]]:
    prefix = f"{family_for(model.config).blocks}.{index}."
    return prefix, {m.name: block.get_submodule(m.module.removeprefix(prefix))
                    for m in block_matrices(model, index) if m.name in plan}


class _Reconstruction:
    """The reconstruction pass over the blocks (blocks.BlockPass): each block reconstructed into its state
    file (or replayed from there), then run on the pruned stream to make the next block's input. Under
    torchrun the matrices are shared out (weight_parallel.py) and rank 0 alone reads and writes the state."""

    def __init__(self, job: Job, model: nn.Module, choice, obs: ObsSettings, state_dir: str):
        self.job, self.model, self.choice, self.obs, self.state_dir = job, model, choice, obs, state_dir
        self.stream, lanes = open_lanes(job, model)
        self.hessians = Hessians(self.stream, lanes, job.backend)
        self.handover = Handover(job.device)

    def visit(self, index: int, block: nn.Module, started: float) -> dict:
        self.started = started
        resumed = self._reconstruct(index, block, started)
        for k in range(len(self.stream.hidden)):
            self.stream.advance(block, index, k)
        return {"block": index, "seconds": None, "resumed": resumed}

    def after(self, index: int, entry: dict) -> None:
        entry["seconds"] = time.perf_counter() - self.started

    def _reconstruct(self, index: int, block: nn.Module, started: float) -> bool:
        """Reconstruct block `index` into its state file, or replay it from there; True when replayed."""
        prefix, linears = _block_linears(self.model, block, index, self.job.plan)
        path = _state_file(self.state_dir, index)
        if self._replayed(path, linears):
            return True
        groups = [{prefix + g + ".weight": block.get_submodule(g) for g in group}
                  for group in family_for(self.model.config).sequential]
        groups = [{n: lin for n, lin in members.items() if n in linears} for members in groups]
        stored, masks = self._groups(index, block, [members for members in groups if members])
        if distributed.is_main():
            tensors = {**stored, **{f"{n}.keep": m for n, m in masks.items()}}
            with atomic_file(path) as tmp:
                save_file(tensors, tmp, metadata={"seconds": repr(time.perf_counter() - started)})
        return False

    def _replayed(self, path: str, linears: dict[str, nn.Linear]) -> bool:
        """Whether rank 0 holds the block's reconstructed weights; if so every rank's block takes them (the
        stored weights give the same pruned stream)."""
        saved = _saved_block(path, list(linears)) if distributed.is_main() else None
        if not distributed.agree(saved is not None, self.job.device):
            return False
        for name, lin in linears.items():
            mine = None if saved is None else saved[name].to(self.job.device)
            lin.weight.data.copy_(distributed.broadcast_from(0, mine, self._stored_like(name)))
        return True

    def _stored_like(self, name: str) -> torch.Tensor:
        """A meta tensor of the shape and stored dtype of matrix `name`."""
        dtype, shape = self.job.checkpoint.header[self.job.checkpoint.matrix[name].stored]
        return torch.empty(shape, dtype=_STORED[dtype], device="meta")

    def _groups(self, index: int, block: nn.Module, groups: list[dict[str, nn.Linear]]):
        """Reconstruct the planned linears of one block group by group; ({name: weight as stored}, {name: mask}) on
        rank 0 (empty elsewhere). Each group's Hessian comes from the block as reconstructed so far
        (obs.true_sequential), or all of them from the block as it came in, before any group is reconstructed:
        then the whole block is one phase of the matrices' sharing out, else each group is."""
        phases = groups if self.obs.true_sequential else [{n: m for members in groups for n, m in members.items()}]
        owner = owners([[(n, sweep_cost(lin)) for n, lin in phase.items()] for phase in phases],
                       distributed.world()[1])
        originals = self.job.checkpoint.read(list(owner)) if distributed.is_main() and self.choice else {}
        stored, masks = {}, {}

        def hessian(members):
            return self.hessians.of(block, index, next(iter(members.values())), {owner[n] for n in members})

        # held all at once (one matrix per group): the price of the llm-compressor order
        early = [] if self.obs.true_sequential else [hessian(members) for members in groups]
        for phase in phases:
            hs = {n: early[g] for g, members in enumerate(groups) for n in members} if early else \
                dict.fromkeys(phase, hessian(phase))
            results = self._sweeps(phase, hs, owner, originals)
            del hs
            early.clear()
            self._exchange(phase, results, owner, stored, masks)
        return stored, masks

    def _sweeps(self, phase: dict[str, nn.Linear], hs: dict, owner: dict[str, int], originals: dict) -> dict:
        """{name: (weight as stored, mask)} of this rank's matrices of the phase: rank 0 first hands the other
        owners the mask or prior it decides for their matrices, then every owner runs its sweeps (rank 0
        deciding for its own one at a time, as one process does)."""
        rank = distributed.world()[0]
        handed = {n: self._decide(n, lin, owner[n], originals) for n, lin in phase.items() if owner[n] != 0}
        results = {}
        for name, lin in phase.items():
            if owner[name] != rank:
                continue
            keep, prior, kept = handed[name] if rank != 0 else self._decide(name, lin, 0, originals)
            rule = sweep_rule(self.job.plan[name], lin.weight.numel(), keep, prior, kept)
            weight, mask = reconstruct_weight(lin.weight.data, hs[name], rule, name, self.obs, self.job.backend)
            lin.weight.data.copy_(weight)  # in the compute dtype, then as it will be stored:
            results[name] = (lin.weight.data.to(self._stored_like(name).dtype), mask)
        return results

    def _decide(self, name: str, lin: nn.Linear, owner: int, originals: dict) -> tuple:
        """(keep, prior, kept) of matrix `name` on its owner: rank 0's choice from the stored weights."""
        if self.choice is None:
            return None, None, None
        decided = None
        if distributed.is_main():
            keep, prior, kept = self.choice(name, originals[name])
            decided = (None if keep is None else keep.to(self.job.device),
                       None if prior is None else prior.to(self.job.device), kept)
        return self.handover.give(decided, owner, lin.weight)

    def _exchange(self, phase: dict[str, nn.Linear], results: dict, owner: dict[str, int], stored: dict,
                  masks: dict) -> None:
        """Every owner's weights into every rank's block (later groups and the next block see them as stored);
        the weights and masks on rank 0, for its state file."""
        for name, lin in phase.items():
            weight, mask = results.get(name, (None, None))
            weight = distributed.broadcast_from(owner[name], weight, self._stored_like(name))
            lin.weight.data.copy_(weight)
            mask = distributed.deliver(mask, owner[name], {0}, torch.empty(lin.weight.shape, dtype=torch.bool,
                                                                              device="meta"))
            if distributed.is_main():
                stored[name], masks[name] = weight.cpu(), mask.cpu()


def decided_by_rank_0(name: str, weight: torch.Tensor) -> tuple:
    """The `choice` of a torchrun worker: masks are cut from the saliency by rank 0 alone, which holds it."""
    raise RuntimeError(f"{name}: only rank 0 decides the masks (a worker's choice was called)")


@torch.no_grad()
def reconstruct(job: Job, model: nn.Module, choice: Callable[[str, torch.Tensor], tuple] | None,
                obs: ObsSettings, state_dir: str) -> list[dict]:
    """Reconstruct the planned matrices of the job's meta-device skeleton `model`, block by block (read from
    the checkpoint, released afterwards), writing each finished block to `state_dir`; the others keep their
    weights. Returns per-block timings. Masks are cut from the stored weights (as mask-only export does), and
    the pruned stream runs the reconstructed weights as they will be stored (in the checkpoint's dtype).
    obs: the sweep's dampening and block size, and the order of the groups' Hessians."""
    return for_each_block(job, model, _Reconstruction(job, model, choice, obs, state_dir))


def reconstructed_files(state_dir: str) -> dict[str, str]:
    """{matrix name: the block file holding its reconstructed weight and mask}."""
    files = {}
    for entry in sorted(os.listdir(state_dir)):
        if entry.endswith(".safetensors"):
            with safe_open(os.path.join(state_dir, entry), framework="pt") as handle:
                files.update({k: os.path.join(state_dir, entry) for k in handle.keys() if not k.endswith(".keep")})
    return files


def reconstructed(path: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight in the checkpoint's dtype, keep mask) of a reconstructed matrix, from its block file."""
    with safe_open(path, framework="pt") as handle:
        return handle.get_tensor(name), handle.get_tensor(f"{name}.keep")

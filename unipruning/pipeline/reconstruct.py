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

from .. import ops
from ..algorithm.obs import ObsSettings, reconstruct_weight, sweep_rule
from ..io.staging import atomic_file
from ..models import block_matrices, family_for
from .blocks import for_each_block, open_stream
from .job import Job
from .stream import BlockStream, StopForward


def _group_hessian(block: nn.Module, first: nn.Linear, stream: BlockStream, index: int, backend) -> torch.Tensor:
    """2/n X^T X (float32) of `first`'s input over every step; the forward stops at `first`."""
    h = torch.zeros(first.in_features, first.in_features, dtype=torch.float32, device=first.weight.device)
    tokens = 0

    def collect(module, args):
        nonlocal tokens
        x = args[0]
        ops.hessian_accumulate_(h, x, backend=backend)
        tokens += x.numel() // x.shape[-1]
        raise StopForward

    handle = first.register_forward_pre_hook(collect)
    try:
        for k in range(len(stream.hidden)):
            stream.run(block, index, k, partial=True)
    finally:
        handle.remove()
    return h.mul_(2.0 / max(tokens, 1))


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
    file (or replayed from there), then run on the pruned stream to make the next block's input."""

    def __init__(self, job: Job, model: nn.Module, choice, obs: ObsSettings, state_dir: str):
        self.job, self.model, self.choice, self.obs, self.state_dir = job, model, choice, obs, state_dir
        self.stream = open_stream(job, model)

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
        saved = _saved_block(path, list(linears))
        if saved is not None:  # replay: the stored weights give the same pruned stream
            for name, lin in linears.items():
                lin.weight.data.copy_(saved[name].to(lin.weight.device))
            return True
        originals = self.job.checkpoint.read(list(linears))  # stored dtype: what masks and outputs are cut from
        groups = [{prefix + g + ".weight": block.get_submodule(g) for g in group}
                  for group in family_for(self.model.config).sequential]
        groups = [{n: lin for n, lin in members.items() if n in linears} for members in groups]
        stored, masks = self._groups(index, block, [members for members in groups if members], originals)
        tensors = {**stored, **{f"{n}.keep": m for n, m in masks.items()}}
        with atomic_file(path) as tmp:
            save_file(tensors, tmp, metadata={"seconds": repr(time.perf_counter() - started)})
        return False

    def _groups(self, index: int, block: nn.Module, groups: list[dict[str, nn.Linear]],
                originals: dict[str, torch.Tensor]):
        """Reconstruct the planned linears of one block group by group; ({name: weight as stored}, {name: mask}).
        Each group's Hessian comes from the block as reconstructed so far (obs.true_sequential), or all of them
        from the block as it came in, collected before any group is reconstructed."""
        stored, masks = {}, {}

        def hessian(members):
            return _group_hessian(block, next(iter(members.values())), self.stream, index, self.job.backend)

        # held all at once (one matrix per group): the price of the llm-compressor order
        early = [] if self.obs.true_sequential else [hessian(members) for members in groups]
        for g, members in enumerate(groups):
            h = early[g] if early else hessian(members)
            for name, lin in members.items():
                weight, mask = self._sweep(name, lin, h, originals[name])
                masks[name] = mask.cpu()
                lin.weight.data.copy_(weight)  # in the compute dtype, then as it will be stored:
                stored[name] = lin.weight.data.to(originals[name].dtype).cpu()
                lin.weight.data.copy_(stored[name])  # later groups and the next block see that
            del h
            if early:
                early[g] = None
        return stored, masks

    def _sweep(self, name: str, lin: nn.Linear, h: torch.Tensor, original: torch.Tensor):
        """(reconstructed weight, keep mask) of one linear from its group's Hessian."""
        keep, prior, kept = self.choice(name, original) if self.choice is not None else (None, None, None)
        rule = sweep_rule(self.job.plan[name], lin.weight.numel(), keep, prior, kept)
        return reconstruct_weight(lin.weight.data, h, rule, name, self.obs, self.job.backend)


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

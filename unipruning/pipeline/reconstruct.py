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
from ..algorithm.obs import ObsSettings, dampen_diagonal, reconstruct_weight
from ..config import MaskSpec
from ..io.checkpoint import LazyCheckpoint
from ..io.staging import atomic_file
from ..models import block_matrices, decoder_blocks, family_for
from ..progress import steps_of as steps_of_progress
from .calibrate import steps_of
from .stream import BlockStream, StopForward, capture_block_inputs, release_freed_memory


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


def _reconstruct_block(block: nn.Module, index: int, prefix: str, linears: dict[str, nn.Linear], groups,
                       stream: BlockStream, originals: dict[str, torch.Tensor], choice, plan, backend,
                       obs: ObsSettings):
    """Reconstruct the planned linears of one block group by group; ({name: weight as stored}, {name: mask}).
    Each group's Hessian comes from the block as reconstructed so far (obs.true_sequential), or all of them
    from the block as it came in, collected before any group is reconstructed."""
    stored, masks = {}, {}
    members_of = [{prefix + g + ".weight": block.get_submodule(g) for g in group} for group in groups]
    members_of = [{n: lin for n, lin in members.items() if n in linears} for members in members_of]
    members_of = [members for members in members_of if members]

    def hessian(members):
        return _group_hessian(block, next(iter(members.values())), stream, index, backend)

    # held all at once (one matrix per group): the price of the llm-compressor order
    early = [] if obs.true_sequential else [hessian(members) for members in members_of]
    for g, members in enumerate(members_of):
        h = dampen_diagonal(early[g] if early else hessian(members), obs.diag_damp)
        for name, lin in members.items():
            keep, prior, kept = choice(name, originals[name]) if choice is not None else (None, None, None)
            weight, mask = reconstruct_weight(lin.weight.data, h, keep, plan[name], name, backend, prior, kept,
                                              obs.damp, obs.blocksize)
            masks[name] = mask.cpu()
            lin.weight.data.copy_(weight)  # in the compute dtype, then as it will be stored:
            stored[name] = lin.weight.data.to(originals[name].dtype).cpu()
            lin.weight.data.copy_(stored[name])  # later groups and the next block see that
        del h
        if early:
            early[g] = None
    return stored, masks


def _block_linears(model: nn.Module, block: nn.Module, index: int, plan) -> tuple[str, dict[str, nn.Linear]]:
    prefix = f"{family_for(model.config).blocks}.{index}."
    return prefix, {m.name: block.get_submodule(m.module.removeprefix(prefix))
                    for m in block_matrices(model, index) if m.name in plan}


def _run_block(model, checkpoint: LazyCheckpoint, block: nn.Module, index: int, stream: BlockStream, state_dir: str,
               plan, choice, backend, start: float, obs: ObsSettings) -> bool:
    """Reconstruct block `index` into its state file, or replay it from there; True when replayed."""
    prefix, linears = _block_linears(model, block, index, plan)
    path = _state_file(state_dir, index)
    saved = _saved_block(path, list(linears))
    if saved is not None:  # replay: the stored weights give the same pruned stream
        for name, lin in linears.items():
            lin.weight.data.copy_(saved[name].to(lin.weight.device))
        return True
    originals = checkpoint.read(list(linears))  # stored dtype: what masks and outputs are cut from
    groups = family_for(model.config).sequential
    stored, masks = _reconstruct_block(block, index, prefix, linears, groups, stream, originals, choice, plan,
                                       backend, obs)
    tensors = {**stored, **{f"{n}.keep": m for n, m in masks.items()}}
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata={"seconds": repr(time.perf_counter() - start)})
    return False


@torch.no_grad()
def reconstruct(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int,
    device: torch.device,
    checkpoint: LazyCheckpoint,
    state_dir: str,
    plan: dict[str, MaskSpec],
    choice: Callable[[str, torch.Tensor], tuple] | None,
    backend: str,
    progress: Callable[[int, int], None] | None = None,
    offload: str = "auto",
    obs: ObsSettings | None = None,
) -> list[dict]:
    """Reconstruct the planned matrices ({name: MaskSpec}) of the meta-device skeleton `model`, block by
    block (read from `checkpoint`, released afterwards), writing each finished block to `state_dir`; the
    others keep their weights. Returns per-block timings. Masks are cut from the stored weights (as
    mask-only export does), and the pruned stream runs the reconstructed weights as they will be stored
    (in the checkpoint's dtype). obs: the sweep's dampening and block size."""
    obs = obs or ObsSettings()
    stream = capture_block_inputs(model, steps_of(windows, batch_size), device, offload)
    stream.on_step = steps_of_progress(progress)
    compute_dtype = next(p for p in model.parameters() if not p.is_meta).dtype
    blocks = decoder_blocks(model)
    per_block = []
    if progress is not None:
        progress(0, len(blocks))
    for index in range(len(blocks)):
        start = time.perf_counter()
        block = checkpoint.load_block(model, index, device, compute_dtype)
        try:
            resumed = _run_block(model, checkpoint, block, index, stream, state_dir, plan, choice, backend, start,
                                 obs)
            for k in range(len(stream.hidden)):
                stream.advance(block, index, k)
        finally:
            checkpoint.release_block(model, index)
        release_freed_memory()
        per_block.append({"block": index, "seconds": time.perf_counter() - start, "resumed": resumed})
        if progress is not None:
            progress(index + 1, len(blocks))
    return per_block


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

"""Weight reconstruction after masking (SPEC section 9, `--reconstruct obs`), and SparseGPT's own masks.

A second pass over the decoder blocks, on the PRUNED activation stream: block by block, and within a
block group by group in compute order (q/k/v, then o, then gate/up, then down: the family's
`sequential` table), collect H = 2/n X^T X of the group's input from the block as reconstructed so
far, then run the lazy-batch OBS sweep on each linear of the group with its mask (kernels/reference.py
`obs_sweep_`). The reconstructed block then produces the next block's input. Each block costs one
forward per group plus one for its output, beside the calibration's own forward; the saliency stays
on the dense stream, so `mask` still re-masks in seconds (but each new mask needs this pass again).

Masks come from `keep_for(name, weight)` (the saliency's, for UniPruning), or, with the `sparsegpt`
metric, from SparseGPT's rule applied during the sweep. A Hessian whose factorisation fails is dampened
ten times more and retried, with a logged warning; if it never succeeds (non-finite activations), that
matrix is masked without reconstruction, also logged: never a crash.

Finished blocks are saved atomically in `state_dir` (the reconstructed weights in the checkpoint's
dtype, and the masks), so a killed run resumes after the last finished block with identical bytes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import ops
from .config import MaskSpec, keep_count
from .models import block_matrices, decoder_blocks, family_for
from .saliency import steps_of
from .stream import BlockStream, LazyCheckpoint, _StopForward, capture_block_inputs, release_freed_memory

log = logging.getLogger("unipruning")

DAMP = 0.01  # fraction of the mean Hessian diagonal added to it (SparseGPT's default)
DAMP_RETRIES = 6  # each retry dampens ten times more
BLOCKSIZE = 128  # columns per lazy batch


def _group_hessian(block: nn.Module, first: nn.Linear, stream: BlockStream, index: int, backend) -> torch.Tensor:
    """2/n X^T X (float32) of `first`'s input over every step; the forward stops at `first`."""
    h = torch.zeros(first.in_features, first.in_features, dtype=torch.float32, device=first.weight.device)
    tokens = 0

    def collect(module, args):
        nonlocal tokens
        x = args[0]
        ops.hessian_accumulate_(h, x, backend=backend)
        tokens += x.numel() // x.shape[-1]
        raise _StopForward

    handle = first.register_forward_pre_hook(collect)
    try:
        for k in range(len(stream.hidden)):
            stream.run(block, index, k, partial=True)
    finally:
        handle.remove()
    return h.mul_(2.0 / max(tokens, 1))


def _inverse_factor(h: torch.Tensor, name: str) -> tuple[torch.Tensor | None, torch.Tensor]:
    damp = DAMP
    for attempt in range(DAMP_RETRIES + 1):
        u, dead = ops.obs_inverse_factor(h, damp)
        if u is not None:
            if attempt:
                log.warning("%s: the Hessian needed dampening %.3g (Cholesky failed at %.3g)", name, damp, damp / 10)
            return u, dead
        damp *= 10
    log.warning("%s: the Hessian could not be factorised even with dampening %.3g; masked without "
                "reconstruction", name, damp / 10)
    return None, dead


def sweep_rule(spec: MaskSpec, numel: int) -> dict:
    """SparseGPT's mask rule for a matrix of `numel` entries: N:M, or a count per matrix (layer)."""
    if spec.nm is not None:
        return {"nm": spec.nm}
    return {"prune_count": numel - keep_count(spec.sparsity, numel)}


def reconstruct_linear(
    linear: nn.Linear, h: torch.Tensor, keep: torch.Tensor | None, spec: MaskSpec, name: str, backend,
) -> torch.Tensor:
    """Update `linear.weight` in place (kept entries reconstructed, pruned ones +0.0); return its mask.
    `keep` None: SparseGPT's rule under `spec` chooses the mask during the sweep."""
    w = linear.weight.data.to(torch.float32)
    u, dead = _inverse_factor(h, name)
    if u is None:
        if keep is None:  # no curvature to score by: fall back to magnitude for SparseGPT's rule
            u = torch.eye(w.shape[1], dtype=torch.float32, device=w.device)
        else:
            linear.weight.data.copy_(torch.where(keep, w, 0.0))
            return keep
    w[:, dead] = 0.0
    rule = {} if keep is not None else sweep_rule(spec, w.numel())
    keep = ops.obs_sweep_(w, u, keep, blocksize=BLOCKSIZE, backend=backend, **rule)
    linear.weight.data.copy_(w)
    return keep


def _state_file(state_dir: str, index: int) -> str:
    return os.path.join(state_dir, f"block-{index:05d}.safetensors")


@torch.no_grad()
def reconstruct(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int,
    device: torch.device,
    checkpoint: LazyCheckpoint,
    state_dir: str,
    plan: dict[str, MaskSpec],
    keep_for: Callable[[str, torch.Tensor], torch.Tensor] | None,
    backend: str,
    progress: Callable[[int, int], None] | None = None,
    offload: str = "auto",
) -> list[dict]:
    """Reconstruct the planned matrices ({name: MaskSpec}) of the meta-device skeleton `model`, block by
    block (read from `checkpoint`, released afterwards), writing each finished block to `state_dir`; the
    others keep their weights.
    Returns per-block timings. Masks are cut from the stored weights (as mask-only export does), and
    the pruned stream runs the reconstructed weights as they will be stored (in the checkpoint's dtype)."""
    groups = family_for(model.config).sequential
    stream = capture_block_inputs(model, steps_of(windows, batch_size), device, offload)
    compute_dtype = next(p for p in model.parameters() if not p.is_meta).dtype
    blocks = decoder_blocks(model)
    per_block = []
    for index in range(len(blocks)):
        start = time.perf_counter()
        block = checkpoint.load_block(model, index, device, compute_dtype)
        prefix = f"{family_for(model.config).blocks}.{index}."
        linears = {m.name: block.get_submodule(m.module.removeprefix(prefix))
                   for m in block_matrices(model, index) if m.name in plan}
        path = _state_file(state_dir, index)
        resumed = os.path.isfile(path)
        try:
            if resumed:  # replay: the stored weights give the same pruned stream
                with safe_open(path, framework="pt") as handle:
                    for name, lin in linears.items():
                        lin.weight.data.copy_(handle.get_tensor(name).to(device))
            else:
                originals = checkpoint.read(list(linears))  # stored dtype: what masks and outputs are cut from
                stored, masks = {}, {}
                for group in groups:
                    members = {prefix + g + ".weight": block.get_submodule(g) for g in group}
                    members = {name: lin for name, lin in members.items() if name in linears}
                    if not members:
                        continue
                    h = _group_hessian(block, next(iter(members.values())), stream, index, backend)
                    for name, lin in members.items():
                        keep = keep_for(name, originals[name]) if keep_for is not None else None
                        masks[name] = reconstruct_linear(lin, h, keep, plan[name], name, backend).cpu()
                        # later groups (and the next block) see the weights exactly as they will be stored
                        stored[name] = lin.weight.data.to(originals[name].dtype).cpu()
                        lin.weight.data.copy_(stored[name])
                    del h
                tensors = {**stored, **{f"{n}.keep": m for n, m in masks.items()}}
                seconds = time.perf_counter() - start
                save_file(tensors, path + ".tmp", metadata={"seconds": repr(seconds)})
                os.replace(path + ".tmp", path)
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

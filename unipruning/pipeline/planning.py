"""`prune --dry-run`: what would be pruned, with which sparsity, and what it would cost; nothing written.

The estimate is arithmetic on the checkpoint's shapes (read from the shard headers: no weight is read)
and two throughputs measured here in a fraction of a second (a matmul and a copy on the compute
device), so it is an order of magnitude, stated as such:
- memory (feedback none): the largest decoder block in the compute dtype, the activations between
  blocks (on the device unless offloaded), one micro-batch's MLP intermediate and the block's float32
  saliency state; feedback full: the whole model with gradients and AdamW moments (feedback.py);
- time: the forward FLOPs of every block over the calibration tokens (three times that with the backward
  of feedback full, one more forward per block with --reconstruct obs) at the measured matmul rate, plus
  the mirror steps' memory traffic (about 16 bytes per prunable weight per step) at the measured copy rate.
"""

from __future__ import annotations

import math
import time

import torch

from ..config import Calibration, PruneConfig
from ..io.report import DryRun
from ..models import num_blocks
from .stream import MAX_TOKENS

MIRROR_BYTES = 16  # per prunable weight and step: read W and z, write z, the threshold's pass


def _throughput(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(matmul FLOP/s, copy bytes/s) measured on `device` with small problems (best of three)."""
    n = 1024 if device.type == "cuda" else 384
    a = torch.randn(n, n, device=device).to(dtype)
    big = torch.empty(1 << 24, dtype=torch.uint8, device=device)
    best_mm = best_copy = math.inf
    for _ in range(3):
        for fn, size in ((lambda: a @ a, None), (lambda: big.clone(), big.numel())):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            if size is None:
                best_mm = min(best_mm, elapsed)
            else:
                best_copy = min(best_copy, elapsed)
    return 2 * n**3 / best_mm, 2 * big.numel() / best_copy


def _block_bytes(checkpoint, dtype: torch.dtype) -> int:
    """Bytes of the largest decoder block in `dtype` (from the stored shapes)."""
    per_block: dict[int, int] = {}
    prefix = checkpoint.matrices[0].param.split(".")
    depth = next(i for i, part in enumerate(prefix) if part.isdigit())
    for key, (_, shape) in checkpoint.header.items():
        parts = key.split(".")
        if len(parts) > depth and parts[:depth] == prefix[:depth] and parts[depth].isdigit():
            per_block[int(parts[depth])] = per_block.get(int(parts[depth]), 0) + math.prod(shape)
    return max(per_block.values()) * dtype.itemsize


def _matrix_plan(checkpoint, plan: dict, skipped: dict) -> list[dict]:
    matrices = []
    for m in checkpoint.matrices:
        entry = {"name": m.name, "shape": list(m.shape)}
        if m.name in plan:
            entry.update(sparsity=plan[m.name].sparsity, pattern=plan[m.name].pattern)
        else:
            entry.update(skipped=skipped[m.name])
        matrices.append(entry)
    return matrices


def _memory(checkpoint, config: PruneConfig, seqlen: int, tokens: int, dtype: torch.dtype) -> dict:
    model_config = checkpoint.config
    prunable = sum(m.shape[0] * m.shape[1] for m in checkpoint.matrices)
    if config.feedback == "full":
        from .feedback import needed_bytes

        return {"total_bytes": needed_bytes(checkpoint.num_parameters, prunable, dtype),
                "what": "whole model + gradients + AdamW moments + float32 z"}
    hidden = int(model_config.hidden_size)
    intermediate = int(getattr(model_config, "intermediate_size", None) or getattr(model_config, "ffn_dim", hidden))
    block = _block_bytes(checkpoint, dtype)
    activations = tokens * hidden * dtype.itemsize
    micro = min(MAX_TOKENS, config.batch_size * seqlen) * (intermediate * 3 + hidden * 4) * dtype.itemsize
    state = max(sum(m.shape[0] * m.shape[1] for m in checkpoint.matrices if m.block == b)
                for b in range(num_blocks(model_config))) * 4
    return {"total_bytes": block + activations + micro + state, "largest_block_bytes": block,
            "activations_bytes": activations, "micro_batch_bytes": micro, "saliency_state_bytes": state,
            "what": "one block + activations between blocks + one micro-batch + that block's z "
                    "(activations move to pinned CPU memory with --offload-activations)"}


def _time(checkpoint, config: PruneConfig, nsamples: int, tokens: int, device: torch.device,
          dtype: torch.dtype) -> dict:
    flop_rate, copy_rate = _throughput(device, dtype)
    prunable = sum(m.shape[0] * m.shape[1] for m in checkpoint.matrices)
    hidden = int(checkpoint.config.hidden_size)
    block_params = checkpoint.num_parameters - int(checkpoint.config.vocab_size) * hidden  # all but the embedding
    forwards = 3 if config.feedback == "full" else 1 + (config.reconstruct == "obs")
    flops = 2 * tokens * block_params * forwards
    mirror = 0 if config.metric == "sparsegpt" else nsamples // config.batch_size * prunable * MIRROR_BYTES
    return {"seconds": flops / flop_rate + mirror / copy_rate, "forward_flops": flops, "mirror_bytes": mirror,
            "measured_matmul_flops_per_s": flop_rate, "measured_copy_bytes_per_s": copy_rate}


def dry_run_plan(checkpoint, plan: dict, skipped: dict, config: PruneConfig, calibration: Calibration,
                 device: torch.device, dtype: torch.dtype) -> DryRun:
    """The dry-run report: every prunable matrix with its planned sparsity (or why it is skipped), and
    the memory and time estimate with the throughputs it assumed."""
    tokens = calibration.nsamples * calibration.seqlen
    removed = sum(m.shape[0] * m.shape[1] - round((1 - plan[m.name].sparsity) * m.shape[0] * m.shape[1])
                  for m in checkpoint.matrices if m.name in plan)
    estimate = {"device": str(device), "dtype": str(dtype).removeprefix("torch."),
                "memory": _memory(checkpoint, config, calibration.seqlen, tokens, dtype),
                **_time(checkpoint, config, calibration.nsamples, tokens, device, dtype),
                "note": "an order-of-magnitude estimate from shapes and throughputs measured just now; disk reads "
                        "and attention are not counted"}
    return DryRun(model=checkpoint.model_dir, settings=config.to_dict(),
                  matrices=_matrix_plan(checkpoint, plan, skipped), pruned=len(plan), skipped=len(skipped),
                  prunable_params=sum(m.shape[0] * m.shape[1] for m in checkpoint.matrices),
                  pruned_params_after=checkpoint.num_parameters - removed, estimate=estimate)

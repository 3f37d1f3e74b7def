"""Feedback `full` (docs/method.md, "Feedback full"): the saliency measured along a fine-tuning trajectory.

At each calibration step the whole model runs forward and backward on the step's windows (language-model
loss); the local score S_k is taken from the weights W_k and the activations of that forward, z and t are
updated exactly as with feedback `none` (algorithm/mirror.py), then AdamW moves the weights (lr 1e-4,
betas 0.9/0.999, eps 1e-10, no weight decay, 10% linear warm-up then linear decay, gradient-norm clip 1.0,
gradients zeroed every step). Masks are still applied to the ORIGINAL weights: `prune()` restores them
in the model afterwards, and checkpoint outputs are written from the source files.

The whole model, its gradients and the AdamW state must fit on the device (no layer streaming: the
backward pass needs every layer); `check_fits` refuses with a clear message otherwise. The weights are
trained in the compute dtype (float32 on a CPU, the checkpoint's dtype on a GPU: bfloat16 AdamW steps of
lr 1e-4 are partly lost to rounding, as in the reference).
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from ..config import PruneConfig
from ..errors import UsageError
from ..io.report import proc_bytes
from ..io.saliency import Saliency
from ..models import model_matrices
from ..progress import steps_of
from .calibrate import mirror_state, mirror_update, saliency_metadata, source_stats
from .inputs import observe
from .job import Job

LR, BETAS, EPS, WARMUP, CLIP = 1e-4, (0.9, 0.999), 1e-10, 0.1, 1.0
COPIES = 4  # weights, gradients and AdamW's two moments, each the size of the model
MARGIN = 1.2  # activations of one step, the saliency state, allocator slack


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    available = proc_bytes("/proc/meminfo", "MemAvailable")
    return available if available is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def needed_bytes(params: int, prunable: int, dtype: torch.dtype) -> int:
    """Weights, gradients and AdamW moments in `dtype`, plus float32 z per prunable weight, with margin."""
    return int((params * dtype.itemsize * COPIES + prunable * 4) * MARGIN)


def check_fits(checkpoint, dtype: torch.dtype, device: torch.device) -> None:
    """A one-line error when feedback `full` cannot hold the model of `checkpoint` on `device`."""
    params = checkpoint.num_parameters
    prunable = sum(m.shape[0] * m.shape[1] for m in checkpoint.matrices)
    need, have = needed_bytes(params, prunable, dtype), available_bytes(device)
    if need > have:
        raise UsageError(
            f"`feedback` full keeps the whole model, its gradients and AdamW state on {device.type}: about "
            f"{need / 2**30:.1f} GiB needed, {have / 2**30:.1f} GiB available. Use `feedback` none (layer-streamed, "
            "any model size); sharding full feedback with FSDP is planned")


def _schedule(steps: int):
    warmup = max(1, round(WARMUP * steps))

    def factor(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        return max(0.0, (steps - k) / max(1, steps - warmup))

    return factor


def _trajectory(model: nn.Module, steps: list[torch.Tensor], state, matrices, on_step=None) -> list[float]:
    """Every step: forward and backward on the step's windows, the mirror step from W_k and that
    forward's activations, then AdamW moves the weights (on_step(done, steps) after each). Returns the losses."""
    stats = source_stats(model, matrices, state.config, state.backend)
    params = list(model.parameters())
    device = params[0].device
    optimizer = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(len(steps)))
    losses = []
    try:
        with observe(model, list(stats), lambda source, x: stats[source].add(x)):
            for k, ids in enumerate(steps):
                for s in stats.values():
                    s.reset()
                optimizer.zero_grad(set_to_none=True)
                ids = ids.to(device)
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
                with torch.no_grad():
                    mirror_update(state, model, matrices, k, stats)  # S_k from W_k and this forward, before the step
                torch.nn.utils.clip_grad_norm_(params, CLIP)
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                if on_step is not None:
                    on_step(k + 1, len(steps))
                if not torch.isfinite(loss):
                    raise UsageError(f"`feedback` full: the loss became {losses[-1]} at step {k}; try `dtype` float32")
    finally:
        optimizer.zero_grad(set_to_none=True)
    return losses


def calibrate_full(job: Job, model: nn.Module, config: PruneConfig, restore: bool = True) -> tuple[Saliency, dict]:
    """The saliency of every prunable matrix under feedback `full`, and a report entry (losses, timing).
    The model is moved to the job's device, fine-tuned step by step on the job's windows (the job's progress
    told of each step), and (restore) given its weights back."""
    start = time.perf_counter()
    steps = job.steps()
    home = next(model.parameters()).device
    model.to(job.device)
    originals = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()} if restore else None
    matrices = model_matrices(model)
    state = mirror_state(model, matrices, config, job.backend)
    grad_flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()  # no dropout: the trajectory is a function of the windows and the seed
    try:
        for p in model.parameters():
            p.requires_grad_(True)
        losses = _trajectory(model, steps, state, matrices, steps_of(job.progress))
    finally:
        for p, flag in zip(model.parameters(), grad_flags, strict=True):
            p.requires_grad_(flag)
        if originals is not None:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(originals[n])
        model.train(was_training)
        model.to(home)
    z = {name: value.cpu() for name, value in state.z.items()}
    saliency = Saliency(z=z, t=dict(state.t), metadata=saliency_metadata(model, config, job.windows, list(z),
                                                                         state.unseen()))
    report = {"mode": "full", "optimizer": "AdamW", "lr": LR, "betas": list(BETAS), "eps": EPS, "warmup": WARMUP,
              "clip": CLIP, "steps": len(steps), "loss_first": losses[0], "loss_last": losses[-1],
              "seconds": time.perf_counter() - start}
    return saliency, report

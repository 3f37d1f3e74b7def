"""`prune --dry-run`: what would be pruned, with which sparsity, and what it would cost; nothing written.

Memory is arithmetic on the checkpoint's shapes (the shard headers): feedback none: the largest decoder
block in the compute dtype, the activations between blocks (on the device unless offloaded), one
micro-batch's MLP intermediate and the block's float32 saliency state; feedback full: the whole model
with gradients and AdamW moments (feedback.py).

Time, for the layer-streamed calibration (feedback none), comes from a probe of this device: block 0 is
read from the checkpoint and calibrated for real, by the code a prune runs, on PROBE_STEPS[0] and then
PROBE_STEPS[1] steps of random token windows of the run's shape (after an untimed warm-up run); the two
timings give the block's fixed cost and its cost per step, and every block is taken to cost what block 0
costs (the blocks of the supported families are alike) plus the measured time to read it. What the probe
does not run is added from arithmetic, which is a lower bound: the second pass of --reconstruct obs (one
more forward per block at the measured matmul rate; the OBS sweeps themselves are not counted), feedback
full (forward and backward of the whole model per step) and the sparsegpt metric (no calibration pass:
only that second pass); writing the output (read and write of every tensor) is not counted. On a loaded
machine the probe is as noisy as the machine: the same dry run gave 28 s and 403 s here for a run that
took 158 s (the demo model, 128 windows of 128 tokens, 2 shared CPU cores, 2026-12-01).
"""

from __future__ import annotations

import math
import time

import torch

from ..config import Calibration, PruneConfig
from ..io.report import DryRun
from ..models import block_matrices, num_blocks
from .calibrate import learn_block
from .job import Job
from .stream import MAX_TOKENS, capture_block_inputs

PROBE_STEPS = (1, 3)  # steps of the two probe runs of block 0: fixed cost and cost per step
PROBE_WARMUP = 1  # an untimed run of one step first: first calls allocate and initialise


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _probe(job: Job, config: PruneConfig, seqlen: int) -> dict:
    """Block 0 read and calibrated for real on random windows, PROBE_STEPS[0] then PROBE_STEPS[1] steps of
    `config.batch_size` x `seqlen` tokens: {read_seconds, probe_seconds: {steps: seconds}}."""
    checkpoint, device = job.checkpoint, job.device
    model = job.skeleton()
    vocab = int(checkpoint.config.vocab_size)
    windows = torch.randint(0, vocab, (max(PROBE_STEPS) * config.batch_size, seqlen),
                            generator=torch.Generator().manual_seed(0))
    seconds, read = {}, []
    for steps in (*[PROBE_STEPS[0]] * PROBE_WARMUP, *PROBE_STEPS):
        start = time.perf_counter()
        checkpoint.load_block(model, 0, device, job.dtype)
        _sync(device)
        read.append(time.perf_counter() - start)
        try:
            stream = capture_block_inputs(model, list(windows[: steps * config.batch_size].split(config.batch_size)),
                                          device, job.offload)
            start = time.perf_counter()
            learn_block(model, block_matrices(model, 0), stream, 0, config, job.backend)
            _sync(device)
            seconds[steps] = time.perf_counter() - start
        finally:
            checkpoint.release_block(model, 0)
    return {"read_seconds": min(read), "probe_seconds": seconds}


def extrapolate(probe: dict, steps: int, blocks: int) -> dict:
    """The calibration's seconds from the probe's: per block a fixed cost plus a cost per step (the line
    through the two probe runs, neither below zero: the machine's noise can tilt it), plus the read."""
    (s1, t1), (s2, t2) = sorted(probe["probe_seconds"].items())
    per_step = max((t2 - t1) / (s2 - s1), 0.0)
    fixed = max(t1 - per_step * s1, 0.0)
    block = fixed + per_step * steps + probe["read_seconds"]
    return {"calibration_seconds": blocks * block, "block_seconds": block, "block_fixed_seconds": fixed,
            "step_seconds": per_step, "read_seconds": probe["read_seconds"]}


def _lower_bound_terms(job: Job, config: PruneConfig, tokens: int) -> dict:
    """Arithmetic for what the probe does not run: obs's second pass, feedback full, the sparsegpt metric."""
    if config.feedback == "none" and config.reconstruct == "none" and config.has_saliency:
        return {"seconds": 0.0}
    flop_rate, _ = _throughput(job.device, job.dtype)
    model_config = job.checkpoint.config
    hidden = int(model_config.hidden_size)
    block_params = job.checkpoint.num_parameters - int(model_config.vocab_size) * hidden  # all but the embedding
    forwards = 3 * (config.feedback == "full") + (config.reconstruct == "obs")
    flops = 2 * tokens * block_params * forwards
    return {"seconds": flops / flop_rate, "forward_flops": flops, "measured_matmul_flops_per_s": flop_rate}


def _time(job: Job, config: PruneConfig, calibration: Calibration) -> dict:
    tokens = calibration.nsamples * calibration.seqlen
    extra = _lower_bound_terms(job, config, tokens)
    if config.feedback != "none" or not config.has_saliency:
        return {"seconds": extra["seconds"], "lower_bound": extra, "probe": None,
                "note": "a lower bound from arithmetic (this mode has no layer-streamed calibration to probe)"}
    probe = _probe(job, config, calibration.seqlen)
    calib = extrapolate(probe, calibration.nsamples // config.batch_size, num_blocks(job.checkpoint.config))
    note = ("calibration from a timed probe of block 0 on this device" +
            ("; plus a lower bound for the reconstruction pass" if extra["seconds"] else "") +
            "; reading the calibration text and writing the output are not counted")
    return {"seconds": calib["calibration_seconds"] + extra["seconds"], "calibration": calib, "probe": probe,
            "lower_bound": extra, "note": note}


def dry_run_plan(job: Job, config: PruneConfig, calibration: Calibration) -> DryRun:
    """The dry-run report: every prunable matrix with its planned sparsity (or why it is skipped), and
    the memory and time estimate with the throughputs it assumed."""
    checkpoint, plan = job.checkpoint, job.plan
    tokens = calibration.nsamples * calibration.seqlen
    removed = sum(m.shape[0] * m.shape[1] - round((1 - plan[m.name].sparsity) * m.shape[0] * m.shape[1])
                  for m in checkpoint.matrices if m.name in plan)
    estimate = {"device": str(job.device), "dtype": str(job.dtype).removeprefix("torch."),
                "memory": _memory(checkpoint, config, calibration.seqlen, tokens, job.dtype),
                **_time(job, config, calibration)}
    return DryRun(model=checkpoint.model_dir, settings=config.to_dict(),
                  matrices=_matrix_plan(checkpoint, plan, job.skipped), pruned=len(plan), skipped=len(job.skipped),
                  prunable_params=sum(m.shape[0] * m.shape[1] for m in checkpoint.matrices),
                  pruned_params_after=checkpoint.num_parameters - removed, estimate=estimate)

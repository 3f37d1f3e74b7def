"""The one loop over decoder blocks that every pass shares (calibration, reconstruction, refinement).

Each pass is a `BlockPass`: `visit` does its work on one resident block and leaves the activation stream
advanced past it (the next block's input); `after` runs once the block has left the device (writing a
pruned shard, for instance, without the block's weights still held). The loop makes each block resident
in its turn (read from the checkpoint, or moved to the device for a model in memory), releases it and the
memory it freed, and tells the job's progress.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import nn

from ..models import decoder_blocks
from ..progress import steps_of as steps_of_progress
from . import distributed
from .job import Job
from .stream import BlockStream, capture_block_inputs, release_freed_memory


class BlockPass(Protocol):
    def visit(self, index: int, block: nn.Module, started: float) -> dict:
        """Work on block `index` (resident; made so from time `started` on) and advance the stream past
        it; returns the block's report entry."""

    def after(self, index: int, entry: dict) -> None:
        """Once block `index` has left the device (its entry may still be completed here)."""


def open_stream(job: Job, model: nn.Module, shared: bool = False) -> BlockStream:
    """Block 0's inputs for every step of the job's windows (this process's share of each step when
    `shared`: data-parallel calibration), progress told of each step a block advances."""
    steps = [distributed.share(b) for b in job.steps()] if shared else job.steps()
    stream = capture_block_inputs(model, steps, job.device, job.offload)
    stream.on_step = steps_of_progress(job.progress)
    return stream


def open_lanes(job: Job, model: nn.Module) -> tuple[BlockStream, list[range]]:
    """Block 0's inputs one window per entry, lane by lane (weight_parallel.py: lane p holds the p-th window of
    every step, in step order), for this process's lanes (those of its calibration share); returns the stream
    and the entries of each lane."""
    steps = job.steps()
    positions = distributed.share(torch.arange(job.batch_size)).tolist()
    windows = [step[p : p + 1] for p in positions for step in steps]
    stream = capture_block_inputs(model, windows, job.device, job.offload)
    stream.on_step = steps_of_progress(job.progress)
    return stream, [range(i * len(steps), (i + 1) * len(steps)) for i in range(len(positions))]


@contextlib.contextmanager
def resident(job: Job, model: nn.Module, index: int) -> Iterator[nn.Module]:
    """Block `index` on the job's device for the duration: read from the checkpoint and released to the meta
    device afterwards, or (a model in memory) moved there and back."""
    if job.checkpoint is None:
        block = decoder_blocks(model)[index]
        home = next(block.parameters()).device
        block.to(job.device)
        try:
            yield block
        finally:
            block.to(home)
        return
    block = job.checkpoint.load_block(model, index, job.device, job.dtype)
    try:
        yield block
    finally:
        job.checkpoint.release_block(model, index)


@torch.no_grad()
def for_each_block(job: Job, model: nn.Module, visit: BlockPass) -> list[dict]:
    """Run `visit` over every decoder block of `model` in order; the blocks' report entries."""
    count = len(decoder_blocks(model))
    if job.progress is not None:
        job.progress(0, count)  # the bar shows before block 0, the slowest (it waits for the first steps)
    entries = []
    try:
        for index in range(count):
            started = time.perf_counter()
            with resident(job, model, index) as block:
                entry = visit.visit(index, block, started)
            visit.after(index, entry)
            entries.append(entry)
            release_freed_memory()
            if job.progress is not None:
                job.progress(index + 1, count)
    except BaseException:
        getattr(job.progress, "close", lambda: None)()  # a stopped pass leaves no bar open
        raise
    return entries

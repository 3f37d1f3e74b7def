"""A job resolved once: what every pass over a model's blocks reads, decided by jobs.py before any pass runs.

The options a user gives say what they want ("auto" device, dtype and backend); a `Job` holds what was
resolved from them, so no pass resolves anything again: the checkpoint and its targeting plan, the
calibration windows and how many make a step, where and in which dtype the blocks compute, the kernel
backend, where activations live between blocks, and who is told of the progress.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..config import MaskSpec
from ..io.checkpoint import LazyCheckpoint


@dataclass(frozen=True)
class Job:
    """checkpoint: the source read block by block (None: a model held in memory, whose blocks are moved to
    `device` in their turn); plan: {matrix: MaskSpec} of the matrices cut, skipped: {matrix: why not};
    windows: (nsamples, seqlen) token ids, `batch_size` per step (None: a job that runs no pass);
    device, dtype, backend: resolved (backends.resolve_device, resolve_dtype, resolve); offload: where the
    activations live between blocks (stream.activation_home); progress(done, total) per block of each pass."""

    checkpoint: LazyCheckpoint | None
    plan: dict[str, MaskSpec]
    device: torch.device
    dtype: torch.dtype
    backend: str
    windows: torch.Tensor | None = None
    batch_size: int = 1
    skipped: dict[str, str] = field(default_factory=dict)
    offload: str = "auto"
    progress: Callable[[int, int], None] | None = None
    trust_remote_code: bool = False

    def steps(self) -> list[torch.Tensor]:
        """The calibration steps: consecutive groups of `batch_size` windows (config.Calibration.steps has
        checked that they divide evenly)."""
        return list(self.windows.split(self.batch_size))

    def skeleton(self):
        """The checkpoint's model on the meta device, its non-block tensors on the CPU in the job's dtype."""
        return self.checkpoint.skeleton(self.dtype)

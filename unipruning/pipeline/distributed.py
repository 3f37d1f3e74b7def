"""Data-parallel calibration over processes (torchrun): every rank runs its share of each mirror step's
windows through the current block; the step's activation statistics are combined so that every rank
takes the same mirror step and holds the same saliency; rank 0 writes the outputs.

    torchrun --nproc_per_node=K -m unipruning prune ... --batch-size B     (B a multiple of K)

Step k's B windows are split in K contiguous shares, rank r taking share r, so K ranks with batch size
B compute what one process with batch size B computes. The float64 per-channel sums of the ranks are
gathered and added in rank order (the same on every rank and every run); as with the backends, a sum
in another order agrees after the cast to float32 that the mirror step uses. NCCL on GPUs (each rank on
cuda:LOCAL_RANK), gloo on CPUs. Without torchrun's environment (WORLD_SIZE unset or 1) nothing here
does anything.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..errors import UsageError


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (if any); the device this rank computes on."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def share(batch: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of a step's windows (B, L)."""
    rank, size = world()
    if size == 1:
        return batch
    if batch.shape[0] % size:
        raise UsageError(f"`batch_size` {batch.shape[0]} must be a multiple of the {size} processes")
    per = batch.shape[0] // size
    return batch[rank * per : (rank + 1) * per]


def sum_over_ranks(sqsum: torch.Tensor, tokens: int) -> tuple[torch.Tensor, int]:
    """The ranks' float64 sums added in rank order, and the total token count (identical on every rank)."""
    rank, size = world()
    if size == 1:
        return sqsum, tokens
    parts = [torch.empty_like(sqsum) for _ in range(size)]
    dist.all_gather(parts, sqsum.contiguous())
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    count = torch.tensor([tokens], dtype=torch.int64, device=sqsum.device)
    dist.all_reduce(count)
    return total, int(count.item())


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()

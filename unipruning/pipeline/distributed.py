"""Processes working on one job (torchrun): who they are, and the few exchanges the passes make.

    torchrun --nproc_per_node=K -m unipruning prune ... --batch-size B     (B a multiple of K)

Calibration is data-parallel: step k's B windows are split in K contiguous shares, rank r taking share r,
so K ranks with batch size B compute what one process with batch size B computes. The float64 per-channel
sums of the ranks are gathered and added in rank order (the same on every rank and every run); as with
the backends, a sum in another order agrees after the cast to float32 that the mirror step uses.

The OBS pass is weight-parallel (pipeline/weight_parallel.py): each rank sums the Hessians of its windows
in float32, the ranks' sums are folded in rank order (`fold_in_rank_order`, the order one process sums them
in), the result goes to the ranks that own the group's matrices (`deliver`), and the owners' results reach
every rank (`broadcast_from`). NCCL on GPUs (each rank on cuda:LOCAL_RANK), gloo on CPUs. Without torchrun's
environment (WORLD_SIZE unset or 1) every function here is the identity of one process.

A rank that dies makes the others' next exchange fail (gloo: at once, the connection closes; NCCL: after
$UNIPRUNING_DIST_TIMEOUT seconds, default 600), and torchrun stops the rest (SIGTERM, an interrupt): each
ends with its one line, and rank 0's partial state stays resumable.
"""

from __future__ import annotations

import datetime
import functools
import os
import re
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist

from ..errors import UsageError

TIMEOUT_ENV = "UNIPRUNING_DIST_TIMEOUT"


class PeerLost(RuntimeError):
    """An exchange failed: another process of the job stopped, or did not answer in time (the CLI prints
    the message as the run's one line)."""


def _exchange(function):
    """`function` (which exchanges tensors with the other processes) raising PeerLost, in words, when the
    backend fails (gloo: "Connection closed by peer", a timeout; NCCL: its DistError)."""

    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except RuntimeError as exc:
            cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            cause = re.sub(r"^\[[^\]]*\] ", "", cause).split(". This is typically")[0][:200]
            raise PeerLost(f"rank {world()[0]}: another process of this torchrun job stopped or did not answer "
                           f"({cause})") from None

    return wrapped


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (if any); the device this rank computes on."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    try:
        seconds = float(os.environ.get(TIMEOUT_ENV, "600"))
    except ValueError:
        raise UsageError(f"${TIMEOUT_ENV}: expected seconds, got {os.environ[TIMEOUT_ENV]!r}") from None
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=seconds))
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


@_exchange
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
    return total, total_count(tokens, sqsum.device)


@_exchange
def total_count(count: int, device: torch.device) -> int:
    """The sum of an integer over the ranks (exact)."""
    if world()[1] == 1:
        return count
    value = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(value)
    return int(value.item())


@_exchange
def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


@_exchange
def agree(flag: bool, device: torch.device) -> bool:
    """Rank 0's `flag` on every rank: what rank 0 alone can know (what its disk holds) decides for all."""
    if world()[1] == 1:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int64, device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


@_exchange
def fold_in_rank_order(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """((p0 + p1) + p2) + ... over every rank's `parts`, rank 0's first, each rank's in its order: the sum one
    process holding all the parts in that order computes, to the bit. It travels from rank to rank (each
    adds its parts to what it receives); the result is on the last rank, None elsewhere."""
    rank, size = world()
    total = parts[0] if rank == 0 else torch.empty_like(parts[0])
    if rank > 0:
        dist.recv(total, src=rank - 1)
    for part in parts[1:] if rank == 0 else parts:
        total.add_(part)
    if rank < size - 1:
        dist.send(total, dst=rank + 1)
        return None
    return total


def last_rank() -> int:
    """Where `fold_in_rank_order` leaves its sum."""
    return world()[1] - 1


def _device() -> torch.device:
    """Where the process group's tensors live: this rank's GPU under NCCL, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _empty(like: torch.Tensor) -> torch.Tensor:
    return torch.empty(like.shape, dtype=like.dtype, device=_device())


@_exchange
def deliver(tensor: torch.Tensor | None, src: int, ranks: set[int], like: torch.Tensor) -> torch.Tensor | None:
    """`tensor` (held by rank `src`) on each rank of `ranks`, None on the others; `like` (a meta tensor will
    do) gives the receivers' shape and dtype. Point to point, in rank order: the other ranks do nothing."""
    rank, size = world()
    if size == 1 or rank == src:
        for dst in sorted(ranks - {src}):
            dist.send(_wire(tensor), dst=dst)
        return tensor if rank in ranks else None
    if rank not in ranks:
        return None
    received = _empty(like)
    dist.recv(_wire(received), src=src)
    return received


@_exchange
def broadcast_from(src: int, tensor: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Rank `src`'s `tensor` on every rank, bit for bit (any dtype travels as its bytes); `like` as for
    `deliver`."""
    if world()[1] == 1:
        return tensor
    out = tensor.contiguous() if world()[0] == src else _empty(like)
    dist.broadcast(_wire(out), src=src)
    return out


def _wire(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes, as a uint8 view that every backend sends (bf16 and bool included)."""
    flat = tensor.reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat


def said_by_rank_0(exc: Exception) -> Exception:
    """`exc`, marked as found alike by every process: the CLI prints rank 0's line only (cli.main)."""
    exc.said_by_rank_0 = True
    return exc


def node_first(compute: Callable[[], str]) -> str:
    """compute() on every process, one process per node first (LOCAL_RANK 0: it fills the node's cache, a content
    hash for instance, which the others then read instead of each reading the files again)."""
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    value = compute() if first else None
    barrier()
    return value if first else compute()


@_exchange
def check_same(what: str, value: str, device: torch.device) -> None:
    """One line, on every rank, when `value` (a content hash) differs from rank 0's: the ranks would compute
    on different inputs. `what` names the option at fault."""
    rank, size = world()
    if size == 1:
        return
    mine = (socket.gethostname(), value)
    values: list = [None] * size
    dist.all_gather_object(values, mine)
    other = [(r, host) for r, (host, v) in enumerate(values) if v != values[0][1]]
    if other:
        r, host = other[0]
        raise said_by_rank_0(UsageError(f"`{what}` differs between the processes: rank {r} on {host} reads other "
                                        f"content than rank 0 on {values[0][0]} (give every node the same files)"))

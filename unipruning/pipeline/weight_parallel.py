"""Weight-parallel work on a block's matrices across processes (torchrun), the same bits as one process.

A pass that needs, for each group of matrices reading one input (q/k/v, o, gate/up, down), the Hessian
H = 2/n XᵀX of that input and then works matrix by matrix (the OBS sweep; a mask refinement) shares the work
through this module:

- lanes: the calibration windows form `batch_size` lanes, lane p holding the p-th window of every step in
  step order (blocks.open_lanes); each process holds the lanes of its calibration share and runs every
  forward one window at a time, so no result depends on how many windows a forward holds.
- Hessians (`Hessians.of`): each lane's XᵀX summed in float32 over its windows, then the lanes folded in lane
  order, ((P0 + P1) + P2) + ..., and scaled by 2/n. A lane never straddles processes, and the processes fold
  theirs in rank order (distributed.fold_in_rank_order), so K processes add the same float32 numbers in the
  same order as one process does: the same bits by construction, not by luck of rounding. The result goes
  to the processes that own the group's matrices, and to no other.
- owners (`owners`): the matrices of each phase (a group, or the whole block when every Hessian is taken
  before any matrix changes) are dealt to the processes by cost (`sweep_cost`: rows x columns^2 for the
  sweep, columns^3 for the factorisation), the largest first to the least loaded process.
- what rank 0 alone decides (the mask or prior a matrix is cut with, from the saliency it holds) reaches
  the owner (`Handover`); each owner's results reach every process, bit for bit (distributed.broadcast_from).
With one process every step is the identity and the one-process order is the canonical one.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from . import distributed
from .stream import BlockStream, StopForward


def owners(phases: list[list[tuple[str, int]]], size: int) -> dict[str, int]:
    """{matrix: rank}: in each phase (a list of (name, cost)), the costliest matrix first, each to the rank with
    the least cost in this phase (then the least over the phases so far, then the lowest rank)."""
    owner, total = {}, [0] * size
    for phase in phases:
        load = [0] * size
        for name, cost in sorted(phase, key=lambda item: -item[1]):  # stable: ties keep the family's order
            rank = min(range(size), key=lambda r: (load[r], total[r], r))
            owner[name] = rank
            load[rank] += cost
            total[rank] += cost
    return owner


def sweep_cost(linear: nn.Linear) -> int:
    """The OBS work on a matrix, up to a constant: the sweep's rows x columns^2, plus about columns^3 to factorise
    its Hessian (which each owner does for itself: at the sizes of a small model, k_proj's 192 rows cost nearly
    what q_proj's 576 do)."""
    rows, columns = linear.weight.shape
    return (rows + columns) * columns * columns


class Hessians:
    """H = 2/n XᵀX (float32) of a group's input over every window, on the ranks that own the group."""

    def __init__(self, stream: BlockStream, lanes: list[range], backend: str | None):
        self.stream, self.lanes, self.backend = stream, lanes, backend

    def of(self, block: nn.Module, index: int, first: nn.Linear, ranks: set[int]) -> torch.Tensor | None:
        """H of `first`'s input (the forwards stop there), on the ranks in `ranks`; None on the others."""
        parts, tokens = self._lane_sums(block, index, first)
        total = distributed.fold_in_rank_order(parts)
        tokens = distributed.total_count(tokens, parts[0].device)
        if total is not None:
            total.mul_(2.0 / max(tokens, 1))
        return distributed.deliver(total, distributed.last_rank(), ranks, parts[0])

    def _lane_sums(self, block: nn.Module, index: int, first: nn.Linear) -> tuple[list[torch.Tensor], int]:
        """XᵀX of each of this rank's lanes (rank 0 folds them as they come: it starts the fold) and the
        number of tokens seen."""
        folding = distributed.world()[0] == 0
        parts: list[torch.Tensor] = []
        tokens, current = 0, None

        def collect(module, args):
            nonlocal tokens
            x = args[0]
            ops.hessian_accumulate_(current, x, backend=self.backend)
            tokens += x.numel() // x.shape[-1]
            raise StopForward

        handle = first.register_forward_pre_hook(collect)
        try:
            for lane in self.lanes:
                current = torch.zeros(first.in_features, first.in_features, dtype=torch.float32,
                                      device=first.weight.device)
                for k in lane:
                    self.stream.run(block, index, k, partial=True)
                if folding and parts:
                    parts[0].add_(current)
                else:
                    parts.append(current)
        finally:
            handle.remove()
        return parts, tokens


class Handover:
    """What rank 0 decides for a matrix, (keep mask or None, prior or None, kept count or None), given to the
    matrix's owner; `like` is the matrix's weight (shape and device)."""

    def __init__(self, device: torch.device):
        self.device = device  # where rank 0's header is made (the process group's device)

    def give(self, decided: tuple | None, owner: int, like: torch.Tensor) -> tuple:
        """On rank 0 `decided` (None elsewhere); returns it on `owner`, (None, None, None) on the others."""
        rank = distributed.world()[0]
        if owner == 0 or rank not in (0, owner):
            return decided if rank == owner else (None, None, None)
        if rank == 0:
            keep, prior, kept = decided
            header = torch.tensor([keep is not None, prior is not None, -1 if kept is None else kept],
                                  dtype=torch.int64, device=self.device)
            for tensor in (header, keep, prior):
                if tensor is not None:
                    distributed.deliver(tensor, 0, {owner}, tensor)
            return None, None, None
        header = distributed.deliver(None, 0, {owner}, torch.empty(3, dtype=torch.int64, device="meta"))
        has_keep, has_prior, kept = header.tolist()
        keep = distributed.deliver(None, 0, {owner}, like.new_empty(like.shape, dtype=torch.bool, device="meta")) \
            if has_keep else None
        prior = distributed.deliver(None, 0, {owner}, like.new_empty(like.shape, dtype=torch.float32, device="meta")) \
            if has_prior else None
        return keep, prior, None if kept < 0 else kept

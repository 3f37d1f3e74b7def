"""The torch backend: every kernel under its name, in torch, on any device (the CPU fallback).

The twins of reference.py, except the selections that both backends run as the same torch code
(shared.py: the whole-tensor and per-row top-k by `kthvalue`, the global water-filling); the tests hold
those to the oracle's own statements (stable sorts, a walk of the total order).
"""

from .reference import (
    act_sqsum_,
    candidate_step_,
    hessian_accumulate_,
    kth_smallest,
    mirror_step_,
    mirror_update_,
    nm_mask,
    obs_sweep_,
    rank_keys,
    step_vectors,
)
from .shared import global_keep_counts, row_topk_mask, topk_mask

__all__ = [
    "act_sqsum_",
    "candidate_step_",
    "global_keep_counts",
    "hessian_accumulate_",
    "kth_smallest",
    "mirror_step_",
    "mirror_update_",
    "nm_mask",
    "obs_sweep_",
    "rank_keys",
    "row_topk_mask",
    "step_vectors",
    "topk_mask",
]

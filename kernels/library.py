"""The Triton kernels as torch.library custom ops (namespace `unipruning`), each with a fake
implementation, so they trace under torch.compile and work with tensor subclasses:

    torch.ops.unipruning.act_sqsum_(sqsum, x)                    sqsum += sum_tokens x^2 (in place)
    torch.ops.unipruning.mirror_update_(z, w, ri, ci, cs, kappa, t)   the fused mirror update (in place)
    torch.ops.unipruning.rank_keys(z, w) -> keys                 int64 (z, |W|) rank keys
    torch.ops.unipruning.kth_smallest(values, k) -> value        exact k-th smallest (0-d tensor)
    torch.ops.unipruning.topk_mask(keys, k) -> keep              bool, k largest, ties to lower index
    torch.ops.unipruning.row_topk_mask(keys, k) -> keep          bool, k largest of every row
    torch.ops.unipruning.nm_mask(keys, n, m) -> keep             bool, n largest of every m in a row
    torch.ops.unipruning.hessian_accumulate_(h, x)               h += x^T x, float32 (in place)

The orchestrator calls the launchers directly (no dispatcher overhead); these ops are for users who
compose the kernels in their own compiled code. Registered on import of this module.
"""

from __future__ import annotations

import torch

from .act_stats import act_sqsum_triton
from .mirror import mirror_update_triton
from .nm import nm_mask_triton
from .obs import hessian_accumulate_triton
from .select import kth_smallest_triton, rank_keys_triton, topk_mask_triton
from .shared import row_topk_mask

_NS = "unipruning"


@torch.library.custom_op(f"{_NS}::act_sqsum_", mutates_args=("sqsum",))
def act_sqsum_op(sqsum: torch.Tensor, x: torch.Tensor) -> None:
    act_sqsum_triton(sqsum, x)


@act_sqsum_op.register_fake
def _(sqsum, x):
    torch._check(sqsum.dim() == 1 and x.shape[-1] == sqsum.shape[0],
                 lambda: f"act_sqsum_: sqsum {tuple(sqsum.shape)} is not one entry per channel of x {tuple(x.shape)}")
    torch._check(sqsum.dtype == torch.float64, lambda: f"act_sqsum_: sqsum must be float64, got {sqsum.dtype}")
    return None


@torch.library.custom_op(f"{_NS}::hessian_accumulate_", mutates_args=("h",))
def hessian_accumulate_op(h: torch.Tensor, x: torch.Tensor) -> None:
    hessian_accumulate_triton(h, x)


@hessian_accumulate_op.register_fake
def _(h, x):
    torch._check(h.dim() == 2 and h.shape[0] == h.shape[1] == x.shape[-1],
                 lambda: f"hessian_accumulate_: h {tuple(h.shape)} is not (in, in) for x {tuple(x.shape)}")
    torch._check(h.dtype == torch.float32, lambda: f"hessian_accumulate_: h must be float32, got {h.dtype}")
    return None


@torch.library.custom_op(f"{_NS}::mirror_update_", mutates_args=("z",))
def mirror_update_op(
    z: torch.Tensor,
    weight: torch.Tensor,
    row_inv: torch.Tensor | None,
    col_inv: torch.Tensor | None,
    col_scale: torch.Tensor,
    kappa: float,
    threshold: float,
) -> None:
    mirror_update_triton(z, weight, row_inv, col_inv, col_scale, kappa, threshold)


@mirror_update_op.register_fake
def _(z, weight, row_inv, col_inv, col_scale, kappa, threshold):
    rows, cols = weight.shape
    torch._check(z.shape == weight.shape, lambda: f"mirror_update_: z {tuple(z.shape)} != weight {tuple(weight.shape)}")
    torch._check(z.dtype == torch.float32, lambda: f"mirror_update_: z must be float32, got {z.dtype}")
    torch._check(col_scale.shape == (cols,), lambda: f"mirror_update_: col_scale {tuple(col_scale.shape)} != ({cols},)")
    torch._check((row_inv is None) == (col_inv is None), lambda: "mirror_update_: row_inv and col_inv come together")
    if row_inv is not None:
        torch._check(row_inv.shape == (rows,) and col_inv.shape == (cols,),
                     lambda: f"mirror_update_: row_inv/col_inv {tuple(row_inv.shape)}/{tuple(col_inv.shape)} for "
                             f"weight {(rows, cols)}")
    return None


@torch.library.custom_op(f"{_NS}::rank_keys", mutates_args=())
def rank_keys_op(z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return rank_keys_triton(z, weight)


@rank_keys_op.register_fake
def _(z, weight):
    torch._check(z.shape == weight.shape, lambda: f"rank_keys: z {tuple(z.shape)} != weight {tuple(weight.shape)}")
    return torch.empty_like(z, dtype=torch.int64)


@torch.library.custom_op(f"{_NS}::kth_smallest", mutates_args=())
def kth_smallest_op(values: torch.Tensor, k: int) -> torch.Tensor:
    return kth_smallest_triton(values, k)


@kth_smallest_op.register_fake
def _(values, k):
    torch._check(1 <= k <= values.numel(), lambda: f"kth_smallest: k = {k} outside [1, {values.numel()}]")
    return values.new_empty(())


def _mask_fake(keys, *args):
    torch._check(keys.dtype == torch.int64, lambda: f"mask ops take int64 rank keys, got {keys.dtype}")
    if len(args) == 2:  # nm_mask(keys, n, m)
        n, m = args
        torch._check(0 < n < m and keys.shape[-1] % m == 0,
                     lambda: f"nm_mask: {n}:{m} needs 0 < n < m and in_features {keys.shape[-1]} divisible by m")
    return torch.empty_like(keys, dtype=torch.bool)


@torch.library.custom_op(f"{_NS}::topk_mask", mutates_args=())
def topk_mask_op(keys: torch.Tensor, k: int) -> torch.Tensor:
    return topk_mask_triton(keys, k).clone()  # a fresh tensor, never a view of an internal buffer


@torch.library.custom_op(f"{_NS}::row_topk_mask", mutates_args=())
def row_topk_mask_op(keys: torch.Tensor, k: int) -> torch.Tensor:
    return row_topk_mask(keys, k).clone()


@torch.library.custom_op(f"{_NS}::nm_mask", mutates_args=())
def nm_mask_op(keys: torch.Tensor, n: int, m: int) -> torch.Tensor:
    return nm_mask_triton(keys, n, m).clone()


for _op in (topk_mask_op, row_topk_mask_op, nm_mask_op):
    _op.register_fake(_mask_fake)

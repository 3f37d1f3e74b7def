"""Triton kernels of refine.py: the per-row swap loops (rows, N:M groups) bit-identical to their torch twins
(kernels/refine_twin.py): masks, residuals and swap counts. On a CPU they run under the interpreter
(conftest sets TRITON_INTERPRET), on a GPU compiled."""

import pytest
import torch
from unipruning.kernels import refine_twin as R

from tests.kernel_twins._common import T, device


def _problem(rows, cols, seed, nm=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * cols + 3, cols, generator=gen) * torch.rand(cols, generator=gen).mul(3) + 0.3
    gram = x.T.double() @ x.double()
    gram = ((gram + gram.T) / 2).float()
    w = torch.randn(rows, cols, generator=gen)
    if nm is None:
        keep = torch.rand(rows, cols, generator=gen) < 0.4
    else:
        keep = torch.rand(rows, cols // nm[1], nm[1], generator=gen).argsort(-1).argsort(-1) < nm[0]
        keep = keep.reshape(rows, cols)
    keep[0] = True  # a row with nothing pruned and, below, one with nothing kept: no swap, no NaN
    if rows > 1 and nm is None:
        keep[1] = False
    r = torch.where(keep, 0.0, w) @ gram
    return [t.to(device()) for t in (keep, r, w, gram)]


def _both(fn_kernel, fn_twin, args, *extra):
    keep, r, w, gram = args
    k1, r1, k2, r2 = keep.clone(), r.clone(), keep.clone(), r.clone()
    s1 = fn_kernel(k1, r1, w, gram, *extra)
    s2 = fn_twin(k2, r2, w, gram, *extra)
    assert torch.equal(k1, k2) and torch.equal(r1, r2) and torch.equal(s1, s2)
    return k1, s1


@pytest.mark.parametrize("rows,cols,iters", [(1, 5, 3), (6, 40, 30), (4, 33, 1), (3, 1100, 12)])
def test_row_swaps_are_bit_identical_to_twin(rows, cols, iters):
    args = _problem(rows, cols, seed=rows + cols)
    keep, swaps = _both(T.refine_rows_, R.refine_rows_, args, iters)
    assert torch.equal(keep.sum(1), args[0].sum(1))  # every row keeps its count
    assert int(swaps.max()) <= iters and (rows == 1 or int(swaps.sum()) > 0)
    assert int(swaps[0]) == 0 and (rows == 1 or int(swaps[1]) == 0)


@pytest.mark.parametrize("n,m,rows,cols", [(2, 4, 5, 24), (4, 8, 3, 48), (1, 3, 4, 12), (2, 4, 2, 1200),
                                           (5, 12, 2, 36)])
def test_nm_swaps_are_bit_identical_to_twin(n, m, rows, cols):
    args = _problem(rows, cols, seed=n * m + cols, nm=(n, m))
    keep, swaps = _both(T.refine_nm_, R.refine_nm_, args, m, 20)
    assert (keep.reshape(rows, -1, m).sum(-1) == args[0].reshape(rows, -1, m).sum(-1)).all()
    assert int(swaps.sum()) > 0


def test_zero_iterations_change_nothing_and_bad_inputs_are_refused():
    keep, r, w, gram = _problem(3, 16, seed=0)
    k, rr = keep.clone(), r.clone()
    assert int(T.refine_rows_(k, rr, w, gram, 0).sum()) == 0 and torch.equal(k, keep) and torch.equal(rr, r)
    with pytest.raises(ValueError, match="float32"):
        T.refine_rows_(keep, r, w.double(), gram, 1)
    with pytest.raises(ValueError, match="shaped like w"):
        T.refine_rows_(keep, r, w, gram[:8, :8], 1)
    with pytest.raises(ValueError, match="contiguous"):
        T.refine_rows_(keep, r, w.T.contiguous().T, gram, 1)
    with pytest.raises(ValueError, match="divide"):
        T.refine_nm_(keep, r, w, gram, 3, 1)
    with pytest.raises(ValueError, match="non-negative"):
        T.refine_nm_(keep, r, w, gram, 4, -1)

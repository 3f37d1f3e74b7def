"""Triton kernels of select.py: exact k-th smallest, top-k masks and global keep counts (ties, badly
bracketed samples), against their torch twins. On a CPU they run under the interpreter (conftest sets
TRITON_INTERPRET), on a GPU compiled."""

import pytest
import torch
from unipruning.kernels import reference as R

from tests.kernel_twins._common import SHAPES, T, device


@pytest.mark.parametrize("n", [1, 5, 4097, 70000])
def test_kth_smallest_exact_on_floats_and_keys(n):
    values = torch.randn(n, device=device())
    values[: n // 3] = float(values[0])  # ties
    keys = R.rank_keys(values.abs(), values)
    for k in sorted({1, max(1, n // 2), n}):
        assert torch.equal(T.kth_smallest(values, k).cpu(), R.kth_smallest(values, k).cpu())
        assert int(T.kth_smallest(keys, k)) == int(R.kth_smallest(keys, k))


@pytest.mark.parametrize("shape", SHAPES)
def test_masks_match_twin_under_heavy_ties(shape):
    gen = torch.Generator().manual_seed(5)
    z = torch.randint(0, 3, shape, generator=gen).float().to(device())
    w = torch.randint(-2, 3, shape, generator=gen).float().to(device())
    keys = R.rank_keys(z, w)
    assert torch.equal(T.rank_keys(z, w), keys)
    numel, cols = z.numel(), shape[1]
    for k in sorted({0, 1, numel // 3, numel - 1, numel}):
        got = T.topk_mask(keys, k)
        assert torch.equal(got, R.topk_mask(keys, k)) and int(got.sum()) == k
    for k in sorted({0, 1, cols // 2, cols}):
        assert torch.equal(T.row_topk_mask(keys, k), R.row_topk_mask(keys, k))


def test_global_keep_counts_match_twin_over_several_tensors():
    gen = torch.Generator().manual_seed(9)
    keys = [R.rank_keys(torch.randint(0, 5, (s,), generator=gen).float(),
                        torch.randint(0, 3, (s,), generator=gen).float()).to(device()) for s in (5, 1500, 77, 3000)]
    sizes = [k.numel() for k in keys]
    for total, lo_frac, hi_frac in ((2000, 0.0, 1.0), (1000, 0.2, 0.9), (3000, 0.5, 1.0)):
        lower = [round(lo_frac * s) for s in sizes]
        upper = [round(hi_frac * s) for s in sizes]
        cpu_keys = [k.cpu() for k in keys]
        assert T.global_keep_counts(keys, total, lower, upper) == R.global_keep_counts(cpu_keys, total, lower, upper)


def test_select_widens_a_missed_bracket(monkeypatch):
    """A tiny sample brackets badly: the select must widen and still be exact (also under ties)."""
    from unipruning.kernels import select

    monkeypatch.setattr(select, "_SAMPLE", 4)
    gen = torch.Generator().manual_seed(2)
    values = torch.cat([torch.zeros(500), torch.rand(1500, generator=gen)]).to(device())
    for k in (1, 499, 500, 501, 1234, 2000):
        assert torch.equal(T.kth_smallest(values, k).cpu(), R.kth_smallest(values, k).cpu())
    keys = R.rank_keys(values, values)
    for k in (1, 700, 2000):
        assert torch.equal(T.topk_mask(keys, k), R.topk_mask(keys, k))


def test_select_on_a_tensor_of_ties_bisects_the_overflowing_bracket(monkeypatch):
    from unipruning.kernels import select

    values = torch.full((12_000,), 0.25, device=device())
    values[7] = 2.0
    values[9] = -1.0
    # a sample of 4096 brackets about 2 x 4 sigma of it: cap ~ 6000 < the 11998 tied entries, which overflow
    monkeypatch.setattr(select, "_SAMPLE", 4096)
    calls = []
    real = select._bisect
    monkeypatch.setattr(select, "_bisect", lambda *a: calls.append(a) or real(*a))
    for k in (1, 6_000, 12_000):
        assert torch.equal(T.kth_smallest(values, k).cpu(), R.kth_smallest(values, k).cpu())
    assert len(calls) == 3  # every k lands in the tied bracket
    key, below, equal = select.select_key([values], 6_000, select._FLOAT)
    assert (below, equal) == (1, 11_998)

"""Swap refinement of a mask (algorithm/refine.py): the closed-form gain against brute force, every budget
kept exactly, the error never higher, deterministic, the same masks on both backends."""

import pytest
import torch
from unipruning.kernels.reference import nm_mask, rank_keys, row_topk_mask, topk_mask

from unipruning import UsageError
from unipruning.algorithm.refine import output_error, refine_mask, swap_gains


def _problem(rows=12, cols=32, tokens=200, seed=0):
    """W and G = X^T X of correlated inputs with uneven channel scales (what real activations look like)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5 + torch.eye(cols)
    x = (torch.randn(tokens, cols, generator=gen) @ mix) * torch.rand(cols, generator=gen).mul(4) + 0.5
    g = x.T.double() @ x.double()
    return torch.randn(rows, cols, generator=gen), ((g + g.T) / 2).float(), gen


def _masks(w, gen):
    keys = rank_keys(torch.rand(w.shape, generator=gen), w)
    return {"row": row_topk_mask(keys, w.shape[1] // 2), "2:4": nm_mask(keys, 2, 4), "1:3": None,
            "matrix": topk_mask(keys, w.numel() * 3 // 10)}


def test_closed_form_gain_equals_brute_force():
    w, g, gen = _problem(rows=3, cols=10)
    keep = torch.rand(w.shape, generator=gen) < 0.5
    gains = swap_gains(w, keep, g)
    for i in range(w.shape[0]):
        base = output_error(w[i:i + 1], keep[i:i + 1], g)
        for p in (~keep[i]).nonzero()[:, 0].tolist():
            for q in keep[i].nonzero()[:, 0].tolist():
                swapped = keep[i:i + 1].clone()
                swapped[0, p], swapped[0, q] = True, False
                brute = output_error(w[i:i + 1], swapped, g) - base
                assert float(gains[i, p, q]) == pytest.approx(brute, rel=1e-9, abs=1e-9 * base)
    assert torch.isinf(gains[keep[:, :, None].expand_as(gains)]).all()  # p kept: not a candidate


@pytest.mark.parametrize("budget", ["row", "2:4", "matrix"])
def test_every_budget_is_kept_exactly_and_the_error_drops(budget):
    w, g, gen = _problem()
    keep = _masks(w, gen)[budget]
    out = refine_mask(w, g, keep, budget, iters=50)
    assert out.swaps > 0 and out.error_after < 0.95 * out.error_before
    assert out.error_before == pytest.approx(output_error(w, keep, g))
    assert out.error_after == pytest.approx(output_error(w, out.keep, g))
    if budget == "row":
        assert torch.equal(out.keep.sum(1), keep.sum(1))
    elif budget == "2:4":
        assert (out.keep.reshape(w.shape[0], -1, 4).sum(-1) == 2).all()
    else:
        assert int(out.keep.sum()) == int(keep.sum())
        assert not torch.equal(out.keep.sum(1), keep.sum(1))  # slots moved between rows
    assert not torch.equal(out.keep, keep)


def test_groups_that_are_not_full_keep_their_own_counts():
    w, g, gen = _problem(cols=30)
    keep = nm_mask(rank_keys(torch.rand(w.shape, generator=gen), w), 1, 3)
    keep[0, :3] = True  # a group with 3 of 3 kept: nothing to swap in it, its count must stay
    out = refine_mask(w, g, keep, "1:3", iters=40)
    assert torch.equal(out.keep.reshape(w.shape[0], -1, 3).sum(-1), keep.reshape(w.shape[0], -1, 3).sum(-1))
    assert out.swaps > 0


def test_refinement_is_deterministic_and_stops_at_a_mask_its_rule_cannot_improve():
    w, g, gen = _problem()
    keep = _masks(w, gen)["row"]
    first, again = refine_mask(w, g, keep, "row", 1000), refine_mask(w, g, keep, "row", 1000)
    assert torch.equal(first.keep, again.keep) and first.swaps == again.swaps
    assert refine_mask(w, g, first.keep, "row", 1000).swaps == 0  # the rule's fixed point
    # there, the pruned entry of least a (un-pruning gain) of every row has no improving partner
    wd, gd = w.double(), g.double()
    r = torch.where(first.keep, 0.0, wd) @ gd
    a = torch.where(first.keep, torch.inf, wd * wd * gd.diagonal() - 2 * wd * r)
    best_p = a.argmin(1)
    partner = swap_gains(w, first.keep, g)[torch.arange(w.shape[0]), best_p].min(1).values
    assert (partner >= -1e-6 * first.error_after).all()


def test_fewer_iterations_make_fewer_swaps_and_zero_none():
    w, g, gen = _problem()
    keep = _masks(w, gen)["row"]
    assert refine_mask(w, g, keep, "row", 0).swaps == 0
    one = refine_mask(w, g, keep, "row", 1)
    assert 0 < one.swaps <= w.shape[0]
    assert (one.keep != keep).sum(1).max() <= 2


def test_float64_gram_and_bad_inputs():
    w, g, gen = _problem()
    keep = _masks(w, gen)["row"]
    assert torch.equal(refine_mask(w, g.double(), keep, "row", 5).keep, refine_mask(w, g, keep, "row", 5).keep)
    with pytest.raises(UsageError, match="refine_iters"):
        refine_mask(w, g, keep, "row", -1)
    with pytest.raises(UsageError, match="expected row, matrix or N:M"):
        refine_mask(w, g, keep, "layer", 5)
    with pytest.raises(UsageError, match="not a multiple of M"):
        refine_mask(w, g, keep, "2:3", 5)
    with pytest.raises(ValueError, match="gram"):
        refine_mask(w, g[:-1], keep, "row", 5)
    with pytest.raises(ValueError, match="finite"):
        refine_mask(w, g * float("nan"), keep, "row", 5)


@pytest.mark.parametrize("budget", ["row", "2:4", "matrix"])
def test_both_backends_refine_to_the_same_mask(budget):
    pytest.importorskip("triton")
    from unipruning import backends

    if not backends.available()["triton"][0]:
        pytest.skip(backends.available()["triton"][1])
    w, g, gen = _problem(rows=5, cols=24)
    keep = _masks(w, gen)[budget]
    a = refine_mask(w, g, keep, budget, 8, backend="torch")
    b = refine_mask(w, g, keep, budget, 8, backend="triton")
    assert torch.equal(a.keep, b.keep) and a.swaps == b.swaps and a.error_after == b.error_after

"""The oracle (kernels/reference.py, the torch twins) and the torch code both backends run (kernels/shared.py):
golden hand-computed cases, invariants, ties; the shared selections against the oracle's own statements;
the metric registry against docs/method.md."""

import itertools
import math
import os
import re

import pytest
import torch
from unipruning.kernels import reference as R
from unipruning.kernels import shared as S
from unipruning.kernels.metric_registry import REGISTRY, metric_spec, stochria_tau


# ----------------------------------------------------------------------------- keys (subsets: test_subsets.py)
def test_derive_key_is_stable_and_sensitive():
    assert S.derive_key(1, 2, 3) == S.derive_key(1, 2, 3)
    assert len({S.derive_key(*p) for p in itertools.product(range(4), repeat=3)}) == 64
    assert S.derive_key(2**40 + 5) != S.derive_key(5)  # large seeds are folded, not truncated
    with pytest.raises(ValueError):
        S.derive_key(-1)


# --------------------------------------------------------------------------------- local metrics
W = torch.tensor([[1.0, -2.0, 0.5], [3.0, 4.0, -1.0]])
SQ = torch.tensor([4.0, 1.0, 16.0], dtype=torch.float64)  # sum x^2 over 4 tokens -> n = [1, .25, 4]


def _score(metric):
    vecs = R.step_vectors(W, SQ, 4, metric)
    return R.local_score(W, *vecs)


def test_magnitude_golden():
    expected = W.abs() / (11.5 / 6)
    assert torch.allclose(_score("magnitude"), expected, rtol=1e-6)


def test_wanda_golden():
    n = torch.tensor([1.0, 0.25, 4.0])
    raw = W.abs() * n.sqrt()
    assert torch.allclose(_score("wanda"), raw / raw.mean(), rtol=1e-6)


def test_ria_golden():
    a = W.abs().double()
    n = torch.tensor([1.0, 0.25, 4.0], dtype=torch.float64)
    raw = (a / a.sum(0, keepdim=True) + a / a.sum(1, keepdim=True)) * n**0.25
    assert torch.allclose(_score("ria").double(), raw / raw.mean(), rtol=1e-6)


def test_stochria_normalised_and_keyed():
    w = torch.randn(40, 30)
    sq = torch.rand(30, dtype=torch.float64) * 10
    s1 = R.local_score(w, *R.step_vectors(w, sq, 8, "stochria", base_key=1))
    s1b = R.local_score(w, *R.step_vectors(w, sq, 8, "stochria", base_key=1))
    s2 = R.local_score(w, *R.step_vectors(w, sq, 8, "stochria", base_key=2))
    assert torch.equal(s1, s1b)
    assert not torch.equal(s1, s2)
    assert abs(float(s1.double().mean()) - 1) < 1e-5


def test_stochria_zero_rows_do_not_explode():
    w = torch.zeros(6, 10)
    w[0] = 1.0
    s = R.local_score(w, *R.step_vectors(w, torch.ones(10, dtype=torch.float64), 1, "stochria", 3))
    assert torch.isfinite(s).all() and (s[1:] == 0).all()


def test_step_vectors_rejects_unknown_metric():
    with pytest.raises(ValueError, match="metric"):
        R.step_vectors(W, SQ, 4, "sparsegpt")


def test_act_sqsum_accumulates_in_float64():
    buf = torch.zeros(3, dtype=torch.float64)
    x = torch.tensor([[[1.0, 2.0, 3.0], [0.5, 0.0, -1.0]]], dtype=torch.float16)
    assert R.act_sqsum_(buf, x) == 2
    assert R.act_sqsum_(buf, x) == 2
    assert torch.equal(buf, torch.tensor([2.5, 8.0, 20.0], dtype=torch.float64))


# -------------------------------------------------------------------------------- mirror update
def test_mirror_update_golden_two_steps():
    z = torch.zeros(2, 3)
    col_scale = torch.tensor([1.0, 1.0, 1.0])
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    R.mirror_update_(z, w, None, None, col_scale, kappa=0.5, threshold=0.0)
    assert torch.equal(z, 0.5 * w)  # Gamma_0 = 0
    # t = 1: Gamma = max(z - 1, 0) = [0, 0, .5, 1, 1.5, 2]; z += .5 (S - Gamma)
    R.mirror_update_(z, w, None, None, col_scale, kappa=0.5, threshold=1.0)
    expected = torch.tensor([[1.0, 2.0, 2.75], [3.5, 4.25, 5.0]])
    assert torch.equal(z, expected)


def test_mirror_update_rounds_each_operation_in_float32():
    z = torch.rand(50, 70)
    w = torch.randn(50, 70)
    vecs = R.step_vectors(w, torch.rand(70, dtype=torch.float64), 3, "ria")
    expected = z.clone()
    s = R.local_score(w, *vecs)
    gamma = torch.clamp(expected - torch.tensor(0.3, dtype=torch.float32), min=0)
    expected = expected + (torch.tensor(0.01, dtype=torch.float32) * (s - gamma))
    R.mirror_update_(z, w, *vecs, kappa=0.01, threshold=0.3)
    assert torch.equal(z, expected)


def test_kth_smallest_exact():
    v = torch.tensor([[5.0, 1.0], [3.0, 3.0]])
    assert float(R.kth_smallest(v, 1)) == 1.0
    assert float(R.kth_smallest(v, 2)) == 3.0
    assert float(R.kth_smallest(v, 4)) == 5.0
    with pytest.raises(ValueError):
        R.kth_smallest(v, 5)


# -------------------------------------------------------------------------------- masks and ties
def test_nm_golden_two_of_four():
    z = torch.arange(1.0, 9.0).reshape(1, 8)
    keep = R.nm_mask(R.rank_keys(z, torch.ones(1, 8)), 2, 4)
    assert (z * keep).tolist() == [[0, 0, 3, 4, 0, 0, 7, 8]]


@pytest.mark.parametrize("impl", [R, S], ids=["oracle", "shared"])
def test_ties_broken_by_weight_then_index(impl):
    z = torch.zeros(1, 4)  # all tied on z
    w = torch.tensor([[0.1, -0.9, 0.9, 0.5]])  # |W| tie between index 1 and 2 -> lower index wins
    keys = R.rank_keys(z, w)
    assert impl.topk_mask(keys, 1).tolist() == [[False, True, False, False]]
    assert impl.topk_mask(keys, 2).tolist() == [[False, True, True, False]]
    assert R.nm_mask(keys, 1, 2).tolist() == [[False, True, True, False]]
    all_tied = R.rank_keys(torch.zeros(2, 4), torch.ones(2, 4))
    assert impl.topk_mask(all_tied, 3).flatten().tolist() == [True] * 3 + [False] * 5
    assert impl.row_topk_mask(all_tied, 1).tolist() == [[True, False, False, False]] * 2


def test_rank_keys_order_is_lexicographic_z_then_abs_weight():
    z = torch.tensor([0.5, 0.5, 0.25, 1.0, 0.0, -0.0])
    w = torch.tensor([1.0, -3.0, 100.0, 0.0, 2.0, 2.0])
    keys = R.rank_keys(z, w).tolist()
    order = sorted(range(6), key=lambda i: keys[i])
    assert order == [5, 4, 2, 0, 1, 3]  # -0 below +0 (total order), then z, then |W|


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (4, 8), (3, 16), (15, 16)])
def test_nm_keeps_exactly_n_per_group_with_ties(n, m):
    z = torch.randint(0, 3, (5, 4 * m)).float()  # heavy ties
    keep = R.nm_mask(R.rank_keys(z, torch.ones_like(z)), n, m)
    assert (keep.reshape(5, 4, m).sum(-1) == n).all()


@pytest.mark.parametrize("impl", [R, S], ids=["oracle", "shared"])
def test_topk_counts_exact_under_ties(impl):
    keys = R.rank_keys(torch.randint(0, 4, (37, 23)).float(), torch.ones(37, 23))
    for k in (0, 1, 100, 500, 851):
        assert int(impl.topk_mask(keys, k).sum()) == k
        assert int(impl.row_topk_mask(keys, min(k, 23)).sum()) == 37 * min(k, 23)


@pytest.mark.parametrize("impl", [R, S], ids=["oracle", "shared"])
def test_topk_keeps_the_largest(impl):
    keys = torch.randperm(1000).reshape(20, 50)
    keep = impl.topk_mask(keys, 300)
    assert keys[keep].min() > keys[~keep].max()


def test_shared_selections_equal_the_oracles_under_heavy_ties():
    """The torch backend's top-k (kthvalue, then the first ties by a cumulative count) against the oracle's
    stable sorts, at every k of a small heavily tied matrix."""
    keys = R.rank_keys(torch.randint(0, 3, (9, 14)).float(), torch.randint(-1, 2, (9, 14)).float())
    for k in range(keys.numel() + 1):
        assert torch.equal(S.topk_mask(keys, k), R.topk_mask(keys, k)), k
    for k in range(keys.shape[1] + 1):
        assert torch.equal(S.row_topk_mask(keys, k), R.row_topk_mask(keys, k)), k


def _brute_force_counts(keys, total, lower, upper):
    order = sorted((-int(v), mi, idx) for mi, k in enumerate(keys) for idx, v in enumerate(k.tolist()))
    for cut in range(len(order) + 1):
        above = [0] * len(keys)
        for _, mi, _ in order[:cut]:
            above[mi] += 1
        counts = [min(max(a, lo), hi) for a, lo, hi in zip(above, lower, upper, strict=True)]
        if sum(counts) == total:
            return counts
    raise AssertionError("no cut")


def test_global_keep_counts_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        nmat = int(torch.randint(1, 5, (1,), generator=gen))
        keys = [torch.randint(-6, 6, (int(torch.randint(1, 25, (1,), generator=gen)),), generator=gen)
                for _ in range(nmat)]
        lower = [int(torch.randint(0, k.numel() // 2 + 1, (1,), generator=gen)) for k in keys]
        upper = [lo + int(torch.randint(0, k.numel() - lo + 1, (1,), generator=gen))
                 for lo, k in zip(lower, keys, strict=True)]
        total = int(torch.randint(sum(lower), sum(upper) + 1, (1,), generator=gen))
        expected = _brute_force_counts(keys, total, lower, upper)
        assert R.global_keep_counts(keys, total, lower, upper) == expected  # the oracle
        assert S.global_keep_counts(keys, total, lower, upper) == expected  # the radix water-filling


@pytest.mark.parametrize("impl", [R, S], ids=["oracle", "shared"])
def test_global_keep_counts_full_key_range_and_infeasible(impl):
    z = torch.tensor([0.0, 1e-30, 3e38, 1.0])
    keys = [R.rank_keys(z, torch.tensor([0.0, 3e38, 1.0, 2.0]))]
    assert impl.global_keep_counts(keys, 2, [0], [4]) == [2]
    with pytest.raises(ValueError, match="infeasible"):
        impl.global_keep_counts(keys, 2, [3], [4])


def test_tau_follows_the_spec():
    assert stochria_tau(4096, 11008) == math.floor(0.2 * 4096)
    assert stochria_tau(3, 100) == 1  # never an empty subset


def _method_table() -> dict[str, tuple[float, str]]:
    """{metric: (channel exponent, normaliser)} as docs/method.md's table of the local metrics states them."""
    doc = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "method.md"), encoding="utf-8").read()
    rows = re.findall(r"^\| (\w+)(?: \(default\))? \| (.+) \|$", doc.split("## Local metrics")[1].split("##")[0], re.M)
    table = {}
    for name, formula in rows[1:]:  # below the header
        exponent = re.search(r"n_j\^([0-9.]+)", formula)
        normaliser = "subsets" if "sub" in formula else "full" if "Σ_k" in formula else "none"
        table[name] = (float(exponent.group(1)) if exponent else 0.0, normaliser)
    return table


def test_docs_method_table_follows_the_metric_registry():
    assert _method_table() == {m.name: (m.channel_exponent, m.normaliser) for m in REGISTRY.values()}
    assert metric_spec("ria").channel_exponent == 0.25 and metric_spec("stochria").channel_exponent == 0.35
    with pytest.raises(ValueError, match="metric must be one of magnitude, wanda, ria, stochria"):
        metric_spec("sparsegpt")

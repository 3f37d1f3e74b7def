"""The stochria subsets (kernels/shared.py `subset_vectors`): exact size, keyed, deterministic, uniform,
and the same members in the torch twin, a brute-force mask and the Triton reduction pass."""

import functools

import pytest
import torch
from unipruning.kernels import reference as R
from unipruning.kernels import shared as S
from unipruning.kernels.metric_registry import stochria_tau

from unipruning import backends

# (rows, cols, tau): odd, non-power-of-two and transposed shapes; tau = 1, stochria's, and min(rows, cols)
CASES = [(1, 1, 1), (3, 5, 1), (3, 5, 3), (5, 3, 3), (7, 64, 1), (7, 64, 7), (64, 7, 7), (33, 100, 20),
         (576, 1536, stochria_tau(576, 1536)), (1536, 576, stochria_tau(1536, 576)), (576, 1536, 576)]


def masks(vectors, rows, cols, tau):
    """Brute force from the definition: (in_row (rows, cols), in_col (rows, cols)) bool membership."""
    pos_r, off_r, pos_c, off_c = (v.long() for v in vectors)
    in_row = (pos_c[None, :] - off_r[:, None]) % cols < tau
    in_col = (pos_r[:, None] - off_c[None, :]) % rows < tau
    return in_row, in_col


@pytest.mark.parametrize("rows,cols,tau", CASES)
def test_exactly_tau_members_per_row_and_column(rows, cols, tau):
    vectors = S.subset_vectors(S.derive_key(1, 2, 3), rows, cols, torch.device("cpu"))
    pos_r, off_r, pos_c, off_c = vectors
    assert all(v.dtype == torch.int32 for v in vectors)
    assert torch.equal(pos_r.sort().values, torch.arange(rows, dtype=torch.int32))  # permutations
    assert torch.equal(pos_c.sort().values, torch.arange(cols, dtype=torch.int32))
    assert 0 <= int(off_r.min()) and int(off_r.max()) < cols and 0 <= int(off_c.min()) and int(off_c.max()) < rows
    in_row, in_col = masks(vectors, rows, cols, tau)
    assert torch.equal(in_row.sum(1), torch.full((rows,), tau))
    assert torch.equal(in_col.sum(0), torch.full((cols,), tau))
    row_sums, col_sums = S.stochastic_subset_sums(torch.ones(rows, cols), S.derive_key(1, 2, 3), tau)
    assert row_sums.dtype == col_sums.dtype == torch.float64
    assert torch.equal(row_sums, torch.full((rows,), float(tau), dtype=torch.float64))
    assert torch.equal(col_sums, torch.full((cols,), float(tau), dtype=torch.float64))


@pytest.mark.parametrize("tau", [0, 4])
def test_tau_outside_the_matrix_is_refused(tau):
    with pytest.raises(ValueError, match="tau must be in"):
        S.stochastic_subset_sums(torch.ones(3, 5), 0, tau)


def _spec_positions(key, n):
    """The definition in Python ints: ranks under the unsigned 64-bit keys (h(j) << 32) | j."""
    h = [S.mix32(S.mix32(j ^ key) ^ S._GOLDEN) for j in range(n)]
    order = sorted(range(n), key=lambda j: (h[j] << 32) | j)
    pos = [0] * n
    for rank, j in enumerate(order):
        pos[j] = rank
    return pos


def _spec_offsets(key, n, modulus):
    return [S.mix32(S.mix32(i ^ key) ^ S._GOLDEN) % modulus for i in range(n)]


@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 5), (7, 64), (64, 7)])
def test_vectors_follow_the_definition(rows, cols):
    """An independent Python-int rendering of the definition (the subsets are part of the saliency
    format: a change here changes stored saliencies)."""
    base = S.derive_key(9, 8, 7)
    pos_r, off_r, pos_c, off_c = (v.tolist() for v in S.subset_vectors(base, rows, cols, torch.device("cpu")))
    assert pos_c == _spec_positions(S.derive_key(base, 0, 0), cols)
    assert off_r == _spec_offsets(S.derive_key(base, 0, 1), rows, cols)
    assert pos_r == _spec_positions(S.derive_key(base, 1, 0), rows)
    assert off_c == _spec_offsets(S.derive_key(base, 1, 1), cols, rows)


def test_deterministic_and_keyed_by_seed_matrix_and_step():
    rows, cols, tau = 40, 90, 8
    cpu = torch.device("cpu")

    def subsets(*parts):
        return masks(S.subset_vectors(S.derive_key(*parts), rows, cols, cpu), rows, cols, tau)

    first = subsets(1, 2, 3)
    assert all(torch.equal(a, b) for a, b in zip(first, subsets(1, 2, 3), strict=True))
    for other in [(4, 2, 3), (1, 5, 3), (1, 2, 6)]:  # another seed, matrix, step
        changed = subsets(*other)
        for a, b in zip(first, changed, strict=True):
            # two independent draws agree on about tau^2/n of each row's tau members
            assert (a & b).sum() < 0.5 * a.sum()


def test_rows_and_columns_get_different_subsets():
    """Row i and row i' share a subset only when their offsets agree (probability 1/cols): count the
    distinct subsets against that expectation."""
    rows, cols = 576, 1536
    tau = stochria_tau(rows, cols)
    in_row, in_col = masks(S.subset_vectors(S.derive_key(0, 1, 2), rows, cols, torch.device("cpu")), rows, cols, tau)
    for m, draws, values in ((in_row, rows, cols), (in_col.T, cols, rows)):
        expected_distinct = values * (1 - (1 - 1 / values) ** draws)
        assert abs(len(set(map(bytes, m.numpy()))) - expected_distinct) < 0.1 * expected_distinct


# ------------------------------------------------------------------------------------ statistics
STAT_ROWS, STAT_COLS, STAT_KEYS = 10, 25, 4000
# Tolerances: the correct construction reads (measured) rows z 3.09, within 0.33, cross 0.13 and
# columns z 3.24, within 0.08, cross 0.07; each broken variant below exceeds some limit 6x or more.
Z_MAX, WITHIN_MAX, CROSS_MAX = 5.0, 0.6, 0.4


def _statistics(stack, tau):
    """stack (keys, n, m) bool, row i's members of draw k. Returns (max z-score of an entry's inclusion
    frequency against tau/m; max relative error of the co-inclusion of two columns in one row against
    tau(tau-1)/(m(m-1)), pooled over rows; the same of one column in two rows against (tau/m)^2)."""
    keys, n, m = stack.shape
    f = stack.double()
    p = tau / m
    z = ((f.mean(0) - p).abs() / (p * (1 - p) / keys) ** 0.5).max()
    within = torch.einsum("kij,kil->jl", f, f)[~torch.eye(m, dtype=torch.bool)] / (keys * n)
    cross = torch.einsum("kij,klj->il", f, f)[~torch.eye(n, dtype=torch.bool)] / (keys * m)
    q = tau * (tau - 1) / (m * (m - 1))
    return float(z), float((within / q - 1).abs().max()), float((cross / p**2 - 1).abs().max())


@functools.lru_cache(maxsize=1)
def _drawn():
    return [S.subset_vectors(S.derive_key(s, 3, 1), STAT_ROWS, STAT_COLS, torch.device("cpu"))
            for s in range(STAT_KEYS)]


def _violations(variant):
    """The limits a subset generator breaks over STAT_KEYS seeds, for rows and columns."""
    rows, cols = STAT_ROWS, STAT_COLS
    tau = stochria_tau(rows, cols)
    both = [masks(variant(v), rows, cols, tau) for v in _drawn()]
    broken = set()
    for axis, stack in (("row", torch.stack([a for a, _ in both])), ("col", torch.stack([b.T for _, b in both]))):
        z, within, cross = _statistics(stack, tau)
        broken |= {f"{axis} {name}" for name, bad in (("z", z > Z_MAX), ("within", within > WITHIN_MAX),
                                                      ("cross", cross > CROSS_MAX)) if bad}
    return broken


def test_inclusion_frequencies_match_uniform_subsets():
    """Deterministic (fixed keys): every entry is included with frequency tau/n, two columns share a row
    and a column two rows as often as for uniform random subsets with independent rows."""
    assert _violations(lambda v: v) == set()


_FIXED = S.subset_vectors(S.derive_key(0), STAT_ROWS, STAT_COLS, torch.device("cpu"))
BROKEN = {
    "unkeyed": lambda v: _FIXED,
    "identity order": lambda v: (torch.arange(STAT_ROWS), v[1], torch.arange(STAT_COLS), v[3]),
    "order fixed over keys": lambda v: (_FIXED[0], v[1], _FIXED[2], v[3]),
    "zero offsets": lambda v: (v[0], v[1] * 0, v[2], v[3] * 0),
    "two offsets": lambda v: (v[0], v[1] % 2, v[2], v[3] % 2),
}


@pytest.mark.parametrize("name", BROKEN)
def test_the_statistics_reject_broken_subsets(name):
    assert _violations(BROKEN[name])


# ------------------------------------------------------------------------------------ the sums
def _integer_weights(rows, cols, seed):
    """Integer magnitudes: every float64 sum of them is exact, so any order of addition agrees bit for
    bit and a single wrong member changes the sum."""
    gen = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, (rows, cols), generator=gen) * 2 - 1
    return (torch.randint(1, 2048, (rows, cols), generator=gen) * sign).float()


@pytest.mark.parametrize("rows,cols,tau", CASES)
def test_twin_sums_equal_brute_force(rows, cols, tau):
    key = S.derive_key(5, 6, 7)
    in_row, in_col = masks(S.subset_vectors(key, rows, cols, torch.device("cpu")), rows, cols, tau)
    exact = _integer_weights(rows, cols, 0).abs()
    row_sums, col_sums = S.stochastic_subset_sums(exact, key, tau)
    assert torch.equal(row_sums, (exact.double() * in_row).sum(1))
    assert torch.equal(col_sums, (exact.double() * in_col).sum(0))
    w = torch.rand(rows, cols, dtype=torch.float64)
    row_sums, col_sums = S.stochastic_subset_sums(w, key, tau)
    assert torch.allclose(row_sums, (w * in_row).sum(1), rtol=1e-13, atol=0)
    assert torch.allclose(col_sums, (w * in_col).sum(0), rtol=1e-13, atol=0)


def _triton_step_sums():
    if not backends.available()["triton"][0]:
        pytest.skip(f"triton backend unavailable: {backends.available()['triton'][1]}")
    from unipruning.kernels.metrics import step_sums_triton

    return step_sums_triton


@pytest.mark.parametrize("shape,programs", [((1, 1), 4096), ((3, 5), 4096), ((5, 3), 4096), ((7, 64), 4096),
                                            ((64, 7), 4096), ((130, 257), 4096), ((200, 130), 4),
                                            ((96, 1100), 4096), ((1100, 96), 4096)])
def test_triton_reduction_equals_twin(shape, programs, monkeypatch):
    """Integer weights: the kernel's float64 sums (other order of addition) equal the twin's exactly, so
    the kernel's membership test picks the very members the twin gathers. `programs` = 4: each program
    walks several row tiles."""
    step_sums_triton = _triton_step_sums()
    from unipruning.kernels import grid, metrics

    monkeypatch.setattr(metrics, "row_tiled", lambda r, c, br, bc, _: grid.row_tiled(r, c, br, bc, programs))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    w = _integer_weights(*shape, 1).to(dev)
    factor = torch.ones(shape[1], dtype=torch.float64, device=dev)
    for step in range(2):
        key = S.derive_key(3, 4, step)
        got = step_sums_triton(w, factor, "stochria", key)
        ref = R.step_sums(w, factor, "stochria", key)
        assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))

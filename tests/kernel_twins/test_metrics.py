"""Triton kernels of metrics.py: the step's reductions (row and column sums, the stochria subsets) and the
step vectors, against their torch twins; the S the fused kernels evaluate against the registry's formula.
On a CPU they run under the interpreter (conftest sets TRITON_INTERPRET), on a GPU compiled."""

from fractions import Fraction

import pytest
import torch
from unipruning.kernels import reference as R
from unipruning.kernels import shared
from unipruning.kernels.metric_registry import METRICS, metric_spec, stochria_tau

from tests._utils import assert_within_twin_error, exact_sums, requires_gpu
from tests.kernel_twins._common import SHAPES, T, device


def _exact_step_sums(w, factor, metric, key):
    """The step's sums, each exactly rounded: fsum of |W| over the members, the weighted rows in fractions."""
    spec = metric_spec(metric)
    a = w.abs().double().cpu()
    col_abs = exact_sums(a, 0)
    if not spec.row_sums:
        return col_abs, None, None, None
    if spec.normaliser == "full":
        row_sum, col_sum = exact_sums(a, 1), col_abs
    else:
        rows, cols = a.shape
        pos_r, off_r, pos_c, off_c = (v.long() for v in shared.subset_vectors(key, rows, cols, torch.device("cpu")))
        tau = stochria_tau(rows, cols)
        row_sum = exact_sums(a * ((pos_c[None, :] - off_r[:, None]) % cols < tau), 1)
        col_sum = exact_sums(a * ((pos_r[:, None] - off_c[None, :]) % rows < tau), 0)
    f = [Fraction(v) for v in factor.cpu().tolist()]
    weighted = torch.tensor([float(sum(Fraction(v) * fj for v, fj in zip(row, f, strict=True))) for row in a.tolist()],
                            dtype=torch.float64)
    return col_abs, row_sum, col_sum, weighted


@pytest.mark.parametrize("shape", SHAPES + [(64, 3), (300, 70)])
@pytest.mark.parametrize("metric", METRICS)
def test_step_sums_and_vectors_match_twin(shape, metric):
    """One reduction pass (stochria subsets by a membership test per entry) against the twin's sums
    (gathers of the same members): float64 sums of the same terms in another order, so within twice the
    twin's own error of the exactly rounded sums (flash-attention's rule), and the float32 vectors exactly."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(*shape, generator=gen).to(device())
    sq = torch.rand(shape[1], generator=gen, dtype=torch.float64).to(device())
    factor = shared.channel_factor(sq, 9, metric, shape[1], w.device)
    from unipruning.kernels.metrics import step_sums_triton

    sums = zip(("col_abs", "row_sum", "col_sum", "weighted_rows"), step_sums_triton(w, factor, metric, 21),
               R.step_sums(w, factor, metric, 21), _exact_step_sums(w, factor, metric, 21), strict=True)
    for name, got, ref, exact in sums:
        assert (got is None) == (ref is None) == (exact is None), name
        if ref is not None:
            assert_within_twin_error(got, ref, exact, name)
    for got, ref in zip(T.step_vectors(w, sq, 9, metric, 21), R.step_vectors(w, sq, 9, metric, 21), strict=True):
        assert (got is None and ref is None) or torch.equal(got, ref)


@pytest.mark.parametrize("metric", METRICS)
def test_kernel_score_is_the_registry_formula(metric):
    """S as the fused update evaluates it (from z = 0 with kappa = 1 and t = 0, z becomes S itself) against
    the formula written out in float64 (reference.metric_score): the factored form rounds at most six times
    in float32 (the three vectors' casts, one add, two products), so each entry lies within 8 u of it."""
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(33, 100, generator=gen).to(device())
    sq = (torch.rand(100, generator=gen, dtype=torch.float64) * 5).to(device())
    z = torch.zeros(w.shape, device=device())
    T.mirror_update_(z, w, *T.step_vectors(w, sq, 9, metric, 5), 1.0, 0.0)
    sums = (None, None)
    if metric_spec(metric).normaliser == "subsets":
        sums = shared.stochastic_subset_sums(w.abs().double(), 5, stochria_tau(*w.shape))
    formula = R.metric_score(metric, w, sq / 9, *sums)
    error = (z.double() - formula).abs()
    assert bool((error <= 8 * 2.0**-24 * formula.abs()).all()), float((error / formula.abs()).max())


@requires_gpu
@pytest.mark.parametrize("metric", ["wanda", "stochria"])
def test_bf16_weights_and_activations_on_gpu(metric):
    w = torch.randn(257, 1000, device="cuda").bfloat16()
    x = torch.randn(3, 100, 1000, device="cuda").bfloat16()
    a = torch.zeros(1000, dtype=torch.float64, device="cuda")
    b = a.clone()
    T.act_sqsum_(a, x)
    R.act_sqsum_(b, x)
    assert torch.equal(a.float(), b.float())
    vec = R.step_vectors(w, a, 300, metric, base_key=1)
    z1 = torch.zeros(w.shape, device="cuda")
    z2 = z1.clone()
    assert T.mirror_step_(z1, w, *vec, 0.01, 0.0, 250, -1) == R.mirror_step_(z2, w, *vec, 0.01, 0.0, 250, -1)
    assert torch.equal(z1, z2)

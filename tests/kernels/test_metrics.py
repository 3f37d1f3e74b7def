"""Triton kernels of metrics.py: the step's reductions (row and column sums, the stochria subsets) and the
step vectors, against their torch twins. On a CPU they run under the interpreter (conftest sets
TRITON_INTERPRET), on a GPU compiled."""

import pytest
import torch
from unipruning.kernels import reference as R

from tests._utils import requires_gpu
from tests.kernels._common import SHAPES, T, device


@pytest.mark.parametrize("shape", SHAPES + [(64, 3), (300, 70)])
@pytest.mark.parametrize("metric", ["magnitude", "wanda", "ria", "stochria"])
def test_step_sums_and_vectors_match_twin(shape, metric):
    """One reduction pass (stochria subsets by a membership test per entry) against the twin's sums
    (gathers of the same members): the same terms, so float64 agrees to rounding and the float32
    vectors exactly."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(*shape, generator=gen).to(device())
    sq = torch.rand(shape[1], generator=gen, dtype=torch.float64).to(device())
    factor = R.channel_factor(sq, 9, metric, shape[1], w.device)
    from unipruning.kernels.metrics import step_sums_triton

    for got, ref in zip(step_sums_triton(w, factor, metric, 21), R.step_sums(w, factor, metric, 21), strict=True):
        assert (got is None) == (ref is None)
        if ref is not None:
            assert torch.allclose(got, ref, rtol=1e-12, atol=0)
    for got, ref in zip(T.step_vectors(w, sq, 9, metric, 21), R.step_vectors(w, sq, 9, metric, 21), strict=True):
        assert (got is None and ref is None) or torch.equal(got, ref)


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

"""Triton kernels of act_stats.py: the sum of x^2 per input channel, against their torch twins. On a CPU
they run under the interpreter (conftest sets TRITON_INTERPRET), on a GPU compiled."""

import pytest
import torch
from unipruning.kernels import reference as R

from tests._utils import assert_within_twin_error, exact_sums
from tests.kernel_twins._common import SHAPES, T, device


@pytest.mark.parametrize("shape", SHAPES + [(3, 5, 40), (2000, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_act_sqsum_matches_twin(shape, dtype):
    """float64 sums of exact squares in another order: within twice the twin's own error of the exactly
    rounded sums (flash-attention's rule), equal after the cast to float32; a second call accumulates."""
    x = torch.randn(*shape, device=device()).to(dtype)
    got = torch.zeros(shape[-1], dtype=torch.float64, device=device())
    ref = got.clone()
    assert T.act_sqsum_(got, x) == R.act_sqsum_(ref, x) == x.numel() // shape[-1]
    exact = exact_sums(x.reshape(-1, shape[-1]).double().square(), 0)
    assert_within_twin_error(got, ref, exact, "sqsum")
    assert torch.equal(got.float(), ref.float())
    assert T.act_sqsum_(got, x) == R.act_sqsum_(ref, x)  # accumulates in place
    assert_within_twin_error(got, ref, exact_sums(torch.stack([exact, exact]), 0), "sqsum, twice")

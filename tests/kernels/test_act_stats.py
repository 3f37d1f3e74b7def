"""Triton kernels of act_stats.py: the sum of x^2 per input channel, against their torch twins. On a CPU
they run under the interpreter (conftest sets TRITON_INTERPRET), on a GPU compiled."""

import pytest
import torch
from unipruning.kernels import reference as R

from tests.kernels._common import SHAPES, T, device


@pytest.mark.parametrize("shape", SHAPES + [(3, 5, 40), (2000, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_act_sqsum_matches_twin(shape, dtype):
    x = torch.randn(*shape, device=device()).to(dtype)
    got = torch.zeros(shape[-1], dtype=torch.float64, device=device())
    ref = got.clone()
    assert T.act_sqsum_(got, x) == R.act_sqsum_(ref, x) == x.numel() // shape[-1]
    assert T.act_sqsum_(got, x) == R.act_sqsum_(ref, x)  # accumulates in place
    assert torch.equal(got.float(), ref.float())
    assert torch.allclose(got, ref, rtol=1e-14, atol=0)

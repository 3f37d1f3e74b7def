"""Triton kernels of obs.py: the Hessian accumulation (to rounding) and the in-block OBS sweep (bit for
bit), against their torch twins. On a CPU they run under the interpreter (conftest sets
TRITON_INTERPRET), on a GPU compiled."""

import pytest
import torch
from unipruning.kernels import reference as R

from tests._utils import requires_gpu
from tests.kernels._common import T, device


# ------------------------------------------------------------------------------ OBS reconstruction
def _obs_problem(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * cols, cols, generator=g)
    h = torch.zeros(cols, cols)
    R.hessian_accumulate_(h, x)
    u, _ = R.obs_inverse_factor(h.mul_(2 / x.shape[0]), 0.01)
    return torch.randn(rows, cols, generator=g).to(device()), u.to(device())


@pytest.mark.parametrize("n,tokens,dtype", [(96, 200, torch.float32), (130, 50, torch.float16), (16, 3, torch.float32)])
def test_hessian_accumulation_matches_twin_to_rounding(n, tokens, dtype):
    x = torch.randn(tokens, n, device=device()).to(dtype)
    got = torch.rand(n, n, device=device())
    ref = got.clone()
    T.hessian_accumulate_(got, x)
    R.hessian_accumulate_(ref, x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rule", ["mask", "sparsegpt", "sparsegpt-nm", "guided", "guided-nm"])
@pytest.mark.parametrize("shape,blocksize", [((40, 200), 64), ((7, 33), 128)])
def test_obs_sweep_is_bit_identical_to_twin(rule, shape, blocksize):
    w, u = _obs_problem(*shape)
    kwargs = {
        "mask": {"keep": R.nm_mask(torch.rand(shape, device=device()), 1, 3) if shape[1] % 3 == 0
                 else torch.rand(shape, device=device()) > 0.6},
        "sparsegpt": {"prune_count": w.numel() * 6 // 10},
        "sparsegpt-nm": {"nm": (1, 3)} if shape[1] % 3 == 0 else {"prune_count": 5},
        "guided": {"prune_count": w.numel() // 2, "prior": torch.rand(shape, device=device()) + 0.01},
        "guided-nm": {"nm": (2, 4) if shape[1] % 4 == 0 else (1, 3), "prior": torch.rand(shape, device=device())},
    }[rule]
    a, b = w.clone(), w.clone()
    keep_a = T.obs_sweep_(a, u, blocksize=blocksize, **kwargs)
    keep_b = R.obs_sweep_(b, u, blocksize=blocksize, **kwargs)
    assert torch.equal(keep_a, keep_b)
    assert torch.equal(a, b)


@requires_gpu
def test_bf16_hessian_on_gpu():
    x = torch.randn(4, 1000, 520, device="cuda").bfloat16()
    got = torch.zeros(520, 520, device="cuda")
    ref = got.clone()
    T.hessian_accumulate_(got, x)
    R.hessian_accumulate_(ref, x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-2)

"""Triton kernels of obs.py: the Hessian accumulation (within twice the twin's own error) and the OBS sweep
with every mask rule, the N:M choice included (bit for bit), against their torch twins. On a CPU they run
under the interpreter (conftest sets TRITON_INTERPRET), on a GPU compiled."""

import pytest
import torch
from unipruning.kernels import reference as R
from unipruning.kernels.shared import obs_inverse_factor

from tests._utils import assert_within_twin_error, requires_gpu
from tests.kernel_twins._common import T, device


# ------------------------------------------------------------------------------ OBS reconstruction
def _obs_problem(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * cols, cols, generator=g)
    h = torch.zeros(cols, cols)
    R.hessian_accumulate_(h, x)
    u, _ = obs_inverse_factor(h.mul_(2 / x.shape[0]), 0.01)
    return torch.randn(rows, cols, generator=g).to(device()), u.to(device())


def _hessians(h0, x):
    """(kernel's, twin's, float64) h0 + x^T x."""
    got, ref = h0.clone(), h0.clone()
    T.hessian_accumulate_(got, x)
    R.hessian_accumulate_(ref, x)
    flat = x.reshape(-1, x.shape[-1]).double()
    return got, ref, h0.double() + flat.T @ flat


@pytest.mark.parametrize("n,tokens,dtype", [(96, 200, torch.float32), (130, 50, torch.float16), (16, 3, torch.float32)])
def test_hessian_accumulation_within_twice_the_twins_error(n, tokens, dtype):
    x = torch.randn(tokens, n, device=device()).to(dtype)
    assert_within_twin_error(*_hessians(torch.rand(n, n, device=device()), x), "h")


def _bits(t):
    return t.view(torch.int32)


@pytest.mark.parametrize("rule", ["mask", "sparsegpt", "sparsegpt-nm", "guided", "guided-nm"])
@pytest.mark.parametrize("shape,blocksize", [((40, 200), 64), ((7, 33), 128)])
def test_obs_sweep_is_bit_identical_to_twin(rule, shape, blocksize):
    w, u = _obs_problem(*shape)
    wide = shape[1] % 8 == 0
    kwargs = {
        "mask": {"keep": R.nm_mask(torch.rand(shape, device=device()), 1, 3) if shape[1] % 3 == 0
                 else torch.rand(shape, device=device()) > 0.6},
        "sparsegpt": {"prune_count": w.numel() * 6 // 10},
        "sparsegpt-nm": {"nm": (2, 4) if wide else (1, 3)},
        "guided": {"prune_count": w.numel() // 2, "prior": torch.rand(shape, device=device()) + 0.01},
        "guided-nm": {"nm": (4, 8) if wide else (2, 3), "prior": torch.rand(shape, device=device())},
    }[rule]
    a, b = w.clone(), w.clone()
    keep_a = T.obs_sweep_(a, u, blocksize=blocksize, **kwargs)
    keep_b = R.obs_sweep_(b, u, blocksize=blocksize, **kwargs)
    assert torch.equal(keep_a, keep_b)
    assert torch.equal(_bits(a), _bits(b))


def test_obs_nm_choice_orders_ties_and_nan_as_the_twin():
    """With U = I the sweep only masks, so the N:M choice is seen alone: heavy ties on the score (integer
    weights, a prior of twos and ones) go to the lower column, NaN scores sort last (kept), signed zeros
    stay; and an N:M rule on a width the groups do not divide is refused as by the twin."""
    g = torch.Generator().manual_seed(3)
    w = torch.randint(-2, 3, (33, 48), generator=g).float()
    w[0, :3] = float("nan")
    w[1, 4] = -0.0
    prior = torch.randint(1, 3, w.shape, generator=g).float()
    u = torch.eye(48)
    for nm, p in (((2, 4), None), ((1, 4), prior), ((5, 8), prior), ((1, 3), None)):
        a, b = w.clone().to(device()), w.clone().to(device())
        kwargs = {"nm": nm, "prior": None if p is None else p.to(device())}
        keep_a = T.obs_sweep_(a, u.to(device()), blocksize=16, **kwargs)
        keep_b = R.obs_sweep_(b, u.to(device()), blocksize=16, **kwargs)
        assert torch.equal(keep_a, keep_b), nm
        assert torch.equal(_bits(a), _bits(b)), nm
    for impl in (T, R):
        with pytest.raises(ValueError, match="in_features % m == 0"):
            impl.obs_sweep_(w[:, :47].clone().to(device()), u[:47, :47].to(device()), nm=(2, 4))


@requires_gpu
def test_bf16_hessian_on_gpu():
    x = torch.randn(4, 1000, 520, device="cuda").bfloat16()
    assert_within_twin_error(*_hessians(torch.zeros(520, 520, device="cuda"), x), "h, bf16")

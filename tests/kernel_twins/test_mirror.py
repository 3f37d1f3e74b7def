"""Triton kernels of mirror.py: the fused z/t update, bit for bit (strided and half inputs; > 2^31 entries
on a GPU), against their torch twins. On a CPU they run under the interpreter (conftest sets
TRITON_INTERPRET), on a GPU compiled."""

import pytest
import torch
from unipruning.kernels import reference as R

from tests._utils import requires_gpu
from tests.kernel_twins._common import SHAPES, T, device


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("metric", ["magnitude", "wanda", "ria", "stochria"])
def test_mirror_steps_match_twin_bit_for_bit(shape, metric):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(*shape, generator=gen).to(device())
    z_kernel = torch.zeros(shape, device=device())
    z_twin = z_kernel.clone()
    m = max(1, int(0.01 * w.numel()))
    t_kernel = t_twin = (0.0, -1)
    for step in range(4):  # step 1 has no hint (radix select), later steps refine the candidates
        sq = (torch.rand(shape[1], generator=gen, dtype=torch.float64) * 5).to(device())
        vec = R.step_vectors(w, sq, 7, metric, base_key=step)
        kernel_vec = T.step_vectors(w, sq, 7, metric, step)
        assert all(a is None or torch.equal(a, b) for a, b in zip(vec, kernel_vec, strict=True))
        t_kernel = T.mirror_step_(z_kernel, w, *vec, 0.01, t_kernel[0], m, t_kernel[1])
        t_twin = R.mirror_step_(z_twin, w, *vec, 0.01, t_twin[0], m, t_twin[1])
        assert torch.equal(z_kernel, z_twin), (step, (z_kernel - z_twin).abs().max())
        assert t_kernel == t_twin


def test_mirror_update_with_strided_half_weight():
    base = torch.randn(40, 96, device=device()).half()
    w = base[:, :64]  # row stride 96: no copy needed
    z1, z2 = torch.rand(40, 64, device=device()), None
    z2 = z1.clone()
    vec = R.step_vectors(w, None, 0, "magnitude")
    T.mirror_update_(z1, w, *vec, 0.05, 0.2)
    R.mirror_update_(z2, w, *vec, 0.05, 0.2)
    assert torch.equal(z1, z2)


@requires_gpu
@pytest.mark.slow  # budget: about 20 s on an H100 (12 GB of tensors)
def test_more_than_2_pow_31_elements_on_gpu():
    rows, cols = 32769, 65536  # 2^31 + 65536 entries: offsets need int64
    w = torch.ones(rows, cols, device="cuda", dtype=torch.bfloat16)
    w[-1, -1] = 3.0
    z = torch.zeros(rows, cols, device="cuda")
    ones = torch.ones(cols, device="cuda")
    t, _ = T.mirror_step_(z, w, None, None, ones, 0.5, 0.0, 1, -1)
    assert float(z[-1, -1]) == 1.5 and float(z[0, 0]) == 0.5 and t == 0.5
    del z
    x = torch.ones(rows, cols, device="cuda", dtype=torch.float16)
    s = torch.zeros(cols, dtype=torch.float64, device="cuda")
    assert T.act_sqsum_(s, x) == rows and float(s[-1]) == rows


def test_steady_state_threshold_comes_from_the_update_pass(monkeypatch):
    """After the first step the new threshold is found among the candidates of the fused pass: the
    fallback select over z (a third full pass) must not run."""
    from unipruning.kernels import mirror

    calls = []
    real = mirror.kth_smallest_triton
    monkeypatch.setattr(mirror, "kth_smallest_triton", lambda v, k: calls.append(k) or real(v, k))
    w = torch.randn(64, 256, device=device())
    vec = R.step_vectors(w, torch.rand(256, dtype=torch.float64, device=device()), 5, "wanda")
    z = torch.zeros(w.shape, device=device())
    t = mirror.mirror_step_triton(z, w, *vec, 0.01, 0.0, 16, -1)
    assert len(calls) == 1  # first step: no previous threshold
    for _ in range(3):
        t = mirror.mirror_step_triton(z, w, *vec, 0.01, t[0], 16, t[1])
    assert len(calls) == 1


def _candidates(shape, count, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=gen).to(device())
    flat = torch.randperm(w.numel(), generator=gen)[:count].to(device())
    rows, cols = (flat // shape[1]).to(torch.int32), (flat % shape[1]).to(torch.int32)
    return w, rows, cols, w.reshape(-1)[flat].abs()


@pytest.mark.parametrize("metric", ["wanda", "ria", "stochria"])
@pytest.mark.parametrize("shape,count", [((33, 100), 700), ((7, 12), 5)])
def test_candidate_steps_match_twin_bit_for_bit(metric, shape, count):
    """The closed form's candidate recursion: z of the gathered entries and every threshold, step after step
    (the first without a hint, then through the predicted window), as the twin computes them."""
    w, rows, cols, a = _candidates(shape, count, 8)
    z_kernel = torch.zeros(count, device=device())
    z_twin = z_kernel.clone()
    m = max(1, count // 10)
    t_kernel = t_twin = (0.0, -1)
    gen = torch.Generator().manual_seed(9)
    for step in range(5):
        sq = (torch.rand(shape[1], generator=gen, dtype=torch.float64) * 5).to(device())
        vec = R.step_vectors(w, sq, 7, metric, base_key=step)
        t_kernel = T.candidate_step_(z_kernel, a, rows, cols, *vec, 0.01, t_kernel[0], m, t_kernel[1])
        t_twin = R.candidate_step_(z_twin, a, rows, cols, *vec, 0.01, t_twin[0], m, t_twin[1])
        assert torch.equal(z_kernel, z_twin), step
        assert t_kernel == t_twin, step


def test_candidate_steady_state_threshold_comes_from_the_update_pass(monkeypatch):
    from unipruning.kernels import mirror

    calls = []
    real = mirror.kth_smallest_triton
    monkeypatch.setattr(mirror, "kth_smallest_triton", lambda v, k: calls.append(k) or real(v, k))
    w, rows, cols, a = _candidates((64, 256), 3000, 10)
    vec = R.step_vectors(w, torch.rand(256, dtype=torch.float64, device=device()), 5, "ria")
    z = torch.zeros(3000, device=device())
    t = (0.0, -1)
    for _ in range(4):
        t = mirror.candidate_step_triton(z, a, rows, cols, *vec, 0.01, t[0], 30, t[1])
    assert len(calls) == 1  # the first step only: then the window holds the threshold

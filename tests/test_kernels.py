"""Triton kernels against their torch twins: exact equality on tie-free and tied inputs, odd shapes,
several blocks per program. On a CPU they run under the interpreter (conftest sets TRITON_INTERPRET);
on a GPU the same tests run compiled."""

import pytest
import torch
from unipruning.kernels import reference as R

from tests._utils import requires_gpu
from unipruning import backends

pytest.importorskip("triton")
if not backends.available()["triton"][0]:
    pytest.skip(f"triton backend unavailable: {backends.available()['triton'][1]}", allow_module_level=True)

from unipruning.kernels import triton_backend as T  # noqa: E402

SHAPES = [(1, 4), (7, 12), (33, 1000), (130, 257)]


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


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


@pytest.mark.parametrize("n", [1, 5, 4097, 70000])
def test_kth_smallest_exact_on_floats_and_keys(n):
    values = torch.randn(n, device=device())
    values[: n // 3] = float(values[0])  # ties
    keys = R.rank_keys(values.abs(), values)
    for k in sorted({1, max(1, n // 2), n}):
        assert torch.equal(T.kth_smallest(values, k).cpu(), R.kth_smallest(values, k).cpu())
        assert int(T.kth_smallest(keys, k)) == int(R.kth_smallest(keys, k))


@pytest.mark.parametrize("shape", SHAPES)
def test_masks_match_twin_under_heavy_ties(shape):
    gen = torch.Generator().manual_seed(5)
    z = torch.randint(0, 3, shape, generator=gen).float().to(device())
    w = torch.randint(-2, 3, shape, generator=gen).float().to(device())
    keys = R.rank_keys(z, w)
    assert torch.equal(T.rank_keys(z, w), keys)
    numel, cols = z.numel(), shape[1]
    for k in sorted({0, 1, numel // 3, numel - 1, numel}):
        got = T.topk_mask(keys, k)
        assert torch.equal(got, R.topk_mask(keys, k)) and int(got.sum()) == k
    for k in sorted({0, 1, cols // 2, cols}):
        assert torch.equal(T.row_topk_mask(keys, k), R.row_topk_mask(keys, k))


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (3, 4), (4, 8), (1, 3), (5, 12), (15, 16)])
def test_nm_mask_matches_twin(n, m):
    gen = torch.Generator().manual_seed(n * 100 + m)
    for rows, groups in ((1, 1), (7, 3), (33, 20)):
        z = torch.randint(0, 4, (rows, groups * m), generator=gen).float().to(device())
        keys = R.rank_keys(z, torch.ones_like(z))
        got = T.nm_mask(keys, n, m)
        assert torch.equal(got, R.nm_mask(keys, n, m))
        assert (got.reshape(rows, groups, m).sum(-1) == n).all()


def test_nm_golden_and_errors():
    keys = R.rank_keys(torch.arange(1.0, 9.0, device=device()).reshape(1, 8), torch.ones(1, 8, device=device()))
    assert T.nm_mask(keys, 2, 4).int().tolist() == [[0, 0, 1, 1, 0, 0, 1, 1]]
    with pytest.raises(ValueError):
        T.nm_mask(keys, 2, 3)


def test_global_keep_counts_match_twin_over_several_tensors():
    gen = torch.Generator().manual_seed(9)
    keys = [R.rank_keys(torch.randint(0, 5, (s,), generator=gen).float(),
                        torch.randint(0, 3, (s,), generator=gen).float()).to(device()) for s in (5, 1500, 77, 3000)]
    sizes = [k.numel() for k in keys]
    for total, lo_frac, hi_frac in ((2000, 0.0, 1.0), (1000, 0.2, 0.9), (3000, 0.5, 1.0)):
        lower = [round(lo_frac * s) for s in sizes]
        upper = [round(hi_frac * s) for s in sizes]
        cpu_keys = [k.cpu() for k in keys]
        assert T.global_keep_counts(keys, total, lower, upper) == R.global_keep_counts(cpu_keys, total, lower, upper)


def test_custom_ops_pass_opcheck():
    from torch.library import opcheck

    dev = device()
    z, w = torch.rand(7, 12, device=dev), torch.randn(7, 12, device=dev)
    keys = R.rank_keys(z, w)
    vec = R.step_vectors(w, torch.rand(12, dtype=torch.float64, device=dev), 2, "ria")
    cases = [
        (torch.ops.unipruning.act_sqsum_, (torch.zeros(12, dtype=torch.float64, device=dev), w)),
        (torch.ops.unipruning.mirror_update_, (z, w, *vec, 0.01, 0.1)),
        (torch.ops.unipruning.rank_keys, (z, w)),
        (torch.ops.unipruning.kth_smallest, (z, 3)),
        (torch.ops.unipruning.topk_mask, (keys, 20)),
        (torch.ops.unipruning.row_topk_mask, (keys, 5)),
        (torch.ops.unipruning.nm_mask, (keys, 2, 4)),
        (torch.ops.unipruning.hessian_accumulate_, (torch.zeros(12, 12, device=dev), w)),
    ]
    for op, args in cases:
        opcheck(op, args)


def test_registry_reports_why_triton_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    status = backends.available("cpu")
    assert status["triton"] == (False, "needs a CUDA device (or TRITON_INTERPRET=1 to interpret on the CPU)")
    assert backends.resolve("auto", "cpu") == "torch"
    from unipruning import UsageError

    with pytest.raises(UsageError, match="`backend` triton cannot run here: needs a CUDA device"):
        backends.resolve("triton", "cpu")
    monkeypatch.setenv("UNIPRUNING_BACKEND", "torch")
    assert backends.resolve(None, "cpu") == "torch"


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
    from unipruning.kernels import mirror, select

    calls = []
    real = select.kth_smallest_triton
    monkeypatch.setattr(select, "kth_smallest_triton", lambda v, k: calls.append(k) or real(v, k))
    w = torch.randn(64, 256, device=device())
    vec = R.step_vectors(w, torch.rand(256, dtype=torch.float64, device=device()), 5, "wanda")
    z = torch.zeros(w.shape, device=device())
    t = mirror.mirror_step_triton(z, w, *vec, 0.01, 0.0, 16, -1)
    assert len(calls) == 1  # first step: no previous threshold
    for _ in range(3):
        t = mirror.mirror_step_triton(z, w, *vec, 0.01, t[0], 16, t[1])
    assert len(calls) == 1


def test_select_widens_a_missed_bracket(monkeypatch):
    """A tiny sample brackets badly: the select must widen and still be exact (also under ties)."""
    from unipruning.kernels import select

    monkeypatch.setattr(select, "_SAMPLE", 4)
    gen = torch.Generator().manual_seed(2)
    values = torch.cat([torch.zeros(500), torch.rand(1500, generator=gen)]).to(device())
    for k in (1, 499, 500, 501, 1234, 2000):
        assert torch.equal(T.kth_smallest(values, k).cpu(), R.kth_smallest(values, k).cpu())
    keys = R.rank_keys(values, values)
    for k in (1, 700, 2000):
        assert torch.equal(T.topk_mask(keys, k), R.topk_mask(keys, k))


def test_select_on_a_tensor_of_ties_bisects_the_overflowing_bracket(monkeypatch):
    from unipruning.kernels import select

    values = torch.full((12_000,), 0.25, device=device())
    values[7] = 2.0
    values[9] = -1.0
    # a sample of 4096 brackets about 2 x 4 sigma of it: cap ~ 6000 < the 11998 tied entries, which overflow
    monkeypatch.setattr(select, "_SAMPLE", 4096)
    calls = []
    real = select._bisect
    monkeypatch.setattr(select, "_bisect", lambda *a: calls.append(a) or real(*a))
    for k in (1, 6_000, 12_000):
        assert torch.equal(T.kth_smallest(values, k).cpu(), R.kth_smallest(values, k).cpu())
    assert len(calls) == 3  # every k lands in the tied bracket
    key, below, equal = select.select_key([values], 6_000, select._FLOAT)
    assert (below, equal) == (1, 11_998)


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

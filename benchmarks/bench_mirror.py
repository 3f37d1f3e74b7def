"""The mirror step of one matrix: S, the z update and the exact next threshold (lam = 0.001).

Bytes moved: W (bf16) read, z (float32) read and written: 10 bytes per entry, the floor of any
implementation. The step vectors (shared torch code on every backend) are timed separately."""

import pytest
import torch
from conftest import LINEAR_SHAPES, PROVIDERS, implementation
from unipruning.kernels import reference


def _setup(shape, metric):
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    sq = torch.rand(shape[1], device="cuda", dtype=torch.float64, generator=gen) * 100
    vec = reference.step_vectors(w, sq, 2048, metric, base_key=1)
    z = torch.zeros(shape, device="cuda")
    return w, vec, z


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_mirror_step(measure, provider, shape):
    w, vec, z = _setup(shape, "ria")
    impl = implementation(provider)
    m = max(1, int(0.001 * z.numel()))
    state = list(impl.mirror_step_(z, w, *vec, 0.01, 0.0, m, -1))  # steady state: after the first step

    def step():
        state[:] = impl.mirror_step_(z, w, *vec, 0.01, state[0], m, state[1])

    measure(step, z.numel() * 10)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_mirror_update_only(measure, provider, shape):
    """The memory-bound update pass alone (no threshold selection): 10 bytes per entry."""
    w, vec, z = _setup(shape, "ria")
    impl = implementation(provider)
    measure(lambda: impl.mirror_update_(z, w, *vec, 0.01, 0.001), z.numel() * 10)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("metric", ["wanda", "ria", "stochria"])
@pytest.mark.parametrize("shape", [(4096, 4096), (28672, 8192)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_step_vectors(measure, provider, metric, shape):
    """The step's reduction pass and its float64 finish (W read once: 2 bytes per entry)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    sq = torch.rand(shape[1], device="cuda", dtype=torch.float64, generator=gen)
    impl = implementation(provider)
    measure(lambda: impl.step_vectors(w, sq, 2048, metric, base_key=1), w.numel() * 2)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", [(8192, 8192), (28672, 8192)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_candidate_step(measure, provider, shape):
    """One step of the closed form's candidate recursion (1% of the matrix, m = 10% of them), steady state:
    z read and written, |W| and two int32 indices read (the vector entries are gathered from L2):
    20 bytes per candidate. The torch twin's kthvalue is the cost docs/gpu-cost-model.md predicts."""
    w, vec, _ = _setup(shape, "ria")
    impl = implementation(provider)
    count = w.numel() // 100
    gen = torch.Generator(device="cuda").manual_seed(1)
    flat = torch.randperm(w.numel(), device="cuda", generator=gen)[:count]
    rows, cols = (flat // shape[1]).to(torch.int32), (flat % shape[1]).to(torch.int32)
    a = w.reshape(-1)[flat].abs().float()
    z = torch.zeros(count, device="cuda")
    state = list(impl.candidate_step_(z, a, rows, cols, *vec, 0.01, 0.0, count // 10, -1))

    def step():
        state[:] = impl.candidate_step_(z, a, rows, cols, *vec, 0.01, state[0], count // 10, state[1])

    measure(step, count * 20)

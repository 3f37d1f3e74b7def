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

"""Activation statistics: sum of x^2 per channel of a (tokens, in) bf16 block into float64."""

import pytest
import torch
from conftest import PROVIDERS, TOKENS, implementation


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("cols", [4096, 11008, 8192, 28672])
def test_act_sqsum(measure, provider, tokens, cols):
    x = torch.randn(tokens, cols, device="cuda", dtype=torch.bfloat16)
    sqsum = torch.zeros(cols, dtype=torch.float64, device="cuda")
    impl = implementation(provider)
    measure(lambda: impl.act_sqsum_(sqsum, x), x.numel() * 2 + cols * 16)

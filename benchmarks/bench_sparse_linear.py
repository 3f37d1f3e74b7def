"""Sparse (2:4, CUTLASS and cuSPARSELt through PyTorch's semi-structured tensors, packed by unipruning)
vs dense `F.linear` on Llama-2-7B/70B linear shapes, from decode (1 token) to prefill (8192 tokens).
FLOPs are the dense count 2*tokens*out*in for every provider, so TFLOP/s compare as speed."""

import pytest
import torch
import torch.nn.functional as F
from conftest import LINEAR_SHAPES
from unipruning.kernels.reference import nm_mask

from unipruning import pack_24

TOKENS = [1, 16, 128, 2048, 8192]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("provider", ["dense", "cutlass", "cusparselt"])
def test_linear(measure, provider, shape, tokens, dtype):
    out_features, in_features = shape
    w = torch.randn(shape, device="cuda", dtype=dtype) * nm_mask(torch.rand(shape, device="cuda"), 2, 4)
    x = torch.randn(tokens, in_features, device="cuda", dtype=dtype)
    weight = w if provider == "dense" else pack_24(w, provider)
    with torch.no_grad():
        fn = lambda: F.linear(x, weight)  # noqa: E731
        fn()
        dense_bytes = w.numel() * 2
        weight_bytes = dense_bytes if provider == "dense" else dense_bytes * 9 // 16
        measure(fn, weight_bytes + (x.numel() + tokens * out_features) * 2,
                flops=2 * tokens * out_features * in_features, rounds=20)

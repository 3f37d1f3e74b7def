"""Exact selection: the k-th value over one tensor and over 1e9 float32 scores in 80 tensors, and
the top-k / per-row / N:M masks of a 70B matrix from its rank keys."""

import pytest
import torch
from conftest import PROVIDERS, implementation
from unipruning.kernels import reference


@pytest.mark.parametrize("provider", PROVIDERS)
def test_kth_smallest_one_tensor(measure, provider):
    values = torch.rand(28672 * 8192, device="cuda")
    impl = implementation(provider)
    measure(lambda: impl.kth_smallest(values, values.numel() // 1000), values.numel() * 4)


def test_kth_over_1e9_scores_in_80_tensors(measure):
    from unipruning.kernels.select import _FLOAT, select_key

    per = 1_000_000_000 // 80
    tensors = [torch.rand(per, device="cuda") for _ in range(80)]
    k = 300_000_000
    measure(lambda: select_key(tensors, k, _FLOAT), 80 * per * 4)
    # exactness on this input: the selected key's count below and at it brackets k
    key, below, equal = select_key(tensors, k, _FLOAT)
    assert below < k <= below + equal


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("kind", ["topk", "row_topk", "nm_2_4"])
def test_masks_70b_matrix(measure, provider, kind):
    shape = (8192, 28672)
    z = torch.rand(shape, device="cuda")
    w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    keys = reference.rank_keys(z, w)
    impl = implementation(provider)
    fn = {"topk": lambda: impl.topk_mask(keys, keys.numel() // 2),
          "row_topk": lambda: impl.row_topk_mask(keys, shape[1] // 2),
          "nm_2_4": lambda: impl.nm_mask(keys, 2, 4)}[kind]
    measure(fn, keys.numel() * 9, rounds=5)

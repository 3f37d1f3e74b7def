"""Triton kernels of nm.py: N:M masks, against their torch twins. On a CPU they run under the interpreter
(conftest sets TRITON_INTERPRET), on a GPU compiled."""

import pytest
import torch
from unipruning.kernels import reference as R

from tests.kernel_twins._common import T, device


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

"""Triton kernels as custom ops (library.py: opcheck of their fakes) and the backend registry, against
their torch twins. On a CPU they run under the interpreter (conftest sets TRITON_INTERPRET), on a GPU
compiled."""

import re

import pytest
import torch
from unipruning.kernels import reference as R

from tests.kernel_twins._common import device
from unipruning import backends


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


@pytest.mark.parametrize("op,args,needle", [
    ("mirror_update_", lambda: (torch.zeros(7, 12), torch.randn(7, 12), None, None, torch.ones(11), 0.01, 0.0),
     "col_scale"),
    ("act_sqsum_", lambda: (torch.zeros(11, dtype=torch.float64), torch.randn(3, 12)), "one entry per channel"),
    ("hessian_accumulate_", lambda: (torch.zeros(12, 12, dtype=torch.float64), torch.randn(3, 12)), "float32"),
    ("rank_keys", lambda: (torch.rand(7, 12), torch.randn(7, 11)), "z (7, 12) != weight"),
    ("nm_mask", lambda: (torch.zeros(7, 10, dtype=torch.int64), 2, 4), "divisible by m"),
])
def test_fakes_check_the_contract_the_kernels_assume(op, args, needle):
    """Under FakeTensorMode (what torch.compile traces with) a call off the kernels' shapes fails at once."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args()]
        with pytest.raises(RuntimeError, match=re.escape(needle)):
            getattr(torch.ops.unipruning, op)(*fake)


def test_both_backends_export_every_kernel_under_the_same_names():
    from unipruning.kernels import torch_backend, triton_backend

    assert sorted(torch_backend.__all__) == sorted(triton_backend.__all__)
    for name in torch_backend.__all__:
        assert callable(getattr(torch_backend, name)) and callable(getattr(triton_backend, name)), name

"""2:4 packing throughput: unipruning's CUTLASS packer (the CUDA kernel of unipruning._C, and its torch
twin) against PyTorch's `to_sparse_semi_structured` (CUTLASS) and `torch._cslt_compress` (cuSPARSELt),
on Llama-2-7B/70B weight shapes. Bytes: the 2:4 weight read, values and metadata written."""

import pytest
import torch
from conftest import LINEAR_SHAPES
from unipruning.kernels.reference import nm_mask

from unipruning.packing import extension, pack_cutlass_torch

PACKERS = ["unipruning-cuda", "unipruning-torch", "torch-cutlass", "torch-cslt"]


def _weight(shape, dtype):
    w = torch.randn(shape, device="cuda", dtype=dtype)
    return w * nm_mask(torch.rand(shape, device="cuda"), 2, 4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("packer", PACKERS)
def test_pack_24(measure, packer, shape, dtype):
    from torch.sparse import SparseSemiStructuredTensorCUTLASS

    w = _weight(shape, dtype)
    if packer == "unipruning-cuda":
        if extension() is None:
            pytest.skip("unipruning._C is not built")
        fn = lambda: torch.ops.unipruning.pack24_cutlass(w, None)  # noqa: E731
    elif packer == "unipruning-torch":
        fn = lambda: pack_cutlass_torch(w)  # noqa: E731
    elif packer == "torch-cutlass":
        fn = lambda: SparseSemiStructuredTensorCUTLASS.from_dense(w)  # noqa: E731
    else:
        fn = lambda: torch._cslt_compress(w)  # noqa: E731
    numel = w.numel()
    measure(fn, numel * 2 + numel + numel // 8)  # read 2 B/entry; write 1 B/entry values + 1/8 B metadata

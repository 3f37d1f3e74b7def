"""2:4 packing: the CUTLASS layout pinned against PyTorch's own converter, round trips, the keep-mask
path, input checks, sparsify_, and (on a GPU) sparse matmuls and cuSPARSELt."""

import pytest
import torch
from torch import nn
from torch.sparse import SparseSemiStructuredTensorCUTLASS
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)
from unipruning.kernels.reference import nm_mask

from tests._utils import requires_gpu
from unipruning import UsageError, pack_24, sparsify_, unpack_24
from unipruning.packing import pack_cutlass_torch, skip_reason, unpack_cutlass_torch

DTYPES = (torch.float16, torch.bfloat16)


def random_24(rows, cols, dtype, seed, degenerate=0.3, device="cpu"):
    """A random 2:4 weight; a fraction of the kept entries are zeroed too, so groups with fewer than
    two non-zeros (and negative zeros) occur."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    keep = nm_mask(torch.rand(rows, cols, generator=g), 2, 4)
    keep &= torch.rand(rows, cols, generator=g) >= degenerate
    return torch.where(keep, w, -0.0 * torch.sign(w)).to(dtype).to(device)


def bits(t):
    return t.view(torch.int16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(32, 64), (64, 128), (96, 320), (224, 192), (512, 1024), (32, 4096)])
def test_cutlass_layout_is_bit_exact_with_pytorch(shape, dtype):
    w = random_24(*shape, dtype, seed=shape[0] * 7 + shape[1])
    values, meta = pack_cutlass_torch(w)
    ref_values, ref_meta = sparse_semi_structured_from_dense_cutlass(w)
    assert meta.dtype == torch.int16 and meta.shape == (shape[0], shape[1] // 16)
    assert torch.equal(bits(values), bits(ref_values))
    assert torch.equal(meta, ref_meta)
    # and PyTorch decodes ours back to the same dense matrix (compared by value: -0.0 == +0.0)
    assert torch.equal(sparse_semi_structured_to_dense_cutlass(values, meta), w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_group_pattern_matches_pytorch(dtype):
    """All 11 patterns of at most two non-zeros in a group of four, in every position of a metadata
    element (4 groups) and of the 32-row interleave."""
    patterns = [p for p in range(16) if bin(p).count("1") <= 2]
    rows, cols = 64, 64 * 11
    w = torch.zeros(rows, cols)
    for r in range(rows):
        for grp in range(cols // 4):
            p = patterns[(grp + r) % len(patterns)]
            for j in range(4):
                if p >> j & 1:
                    w[r, 4 * grp + j] = float(1 + (r * 31 + grp * 7 + j) % 13)
    w = w.to(dtype)
    values, meta = pack_cutlass_torch(w)
    ref_values, ref_meta = sparse_semi_structured_from_dense_cutlass(w)
    assert torch.equal(bits(values), bits(ref_values)) and torch.equal(meta, ref_meta)


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_is_bit_exact_for_pruned_weights(dtype):
    w = random_24(128, 256, dtype, seed=3) + 0.0  # +0.0 zeros, as pruned checkpoints store them
    packed = pack_24(w)
    assert isinstance(packed, SparseSemiStructuredTensorCUTLASS)
    assert packed.packed.shape == (128, 128) and packed.meta.shape == (128, 16)
    dense = unpack_24(packed)
    assert dense.dtype == dtype and torch.equal(bits(dense), bits(w))
    assert torch.equal(packed.to_dense(), w)  # PyTorch's own decoder agrees


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_weight_with_the_engines_nm_mask(dtype):
    """One selection rule: the mask comes from the engine's N:M op, the packer only follows it, even
    where a kept weight is exactly zero."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(64, 128, generator=g).to(dtype)
    w[0, :8] = 0  # kept zeros must stay kept
    keep = nm_mask(torch.rand(64, 128, generator=g), 2, 4)
    values, meta = pack_cutlass_torch(w, keep)
    assert torch.equal(values.reshape(64, -1), w[keep].reshape(64, -1))
    expected = torch.where(keep, w, torch.zeros((), dtype=dtype))
    assert torch.equal(unpack_24(pack_24(w, mask=keep)), expected)
    # the metadata records the mask's positions, not the non-zeros
    decoded_positions = unpack_cutlass_torch(torch.ones_like(values), meta) != 0
    assert torch.equal(decoded_positions, keep)


@pytest.mark.parametrize(
    "weight,mask,layout,needle",
    [
        (torch.zeros(32, 64), None, "cutlass", "1:2, not 2:4"),
        (torch.zeros(2, 32, 64, dtype=torch.float16), None, "cutlass", "2-D"),
        (torch.zeros(48, 64, dtype=torch.float16), None, "cutlass", "rows % 32"),
        (torch.zeros(32, 96, dtype=torch.float16), None, "cutlass", "cols % 64"),
        (torch.ones(32, 64, dtype=torch.float16), None, "cutlass", "not 2:4 sparse"),
        (torch.ones(32, 64, dtype=torch.float16), torch.ones(32, 64, dtype=torch.bool), "cutlass", "exactly 2 of"),
        (torch.ones(32, 64, dtype=torch.float16), torch.ones(32, 64), "cutlass", "bool tensor"),
        (torch.zeros(32, 64, dtype=torch.float16), None, "cusparselt", "CUDA"),
        (torch.zeros(32, 64, dtype=torch.float16), None, "csr", "layout"),
    ],
)
def test_bad_inputs_are_one_line_errors(weight, mask, layout, needle):
    if layout == "cusparselt" and torch.cuda.is_available():
        pytest.skip("the CPU-only refusal")
    with pytest.raises(UsageError, match=needle) as info:
        pack_24(weight, layout, mask=mask)
    assert "\n" not in str(info.value)


def test_unpack_refuses_other_tensors():
    with pytest.raises(UsageError, match="pack_24"):
        unpack_24(torch.zeros(32, 64))


def test_skip_reasons():
    assert skip_reason(random_24(64, 128, torch.float16, seed=1)) is None
    assert "cols % 64" in skip_reason(torch.zeros(64, 32, dtype=torch.float16))
    assert "not 2:4" in skip_reason(torch.ones(64, 128, dtype=torch.bfloat16))
    assert "float16 or bfloat16" in skip_reason(torch.zeros(64, 128))


def test_sparsify_needs_a_gpu_model():
    model = nn.Sequential(nn.Linear(64, 32)).half()
    if torch.cuda.is_available():
        model = model.cpu()
    with pytest.raises(UsageError, match="CUDA GPU"):
        sparsify_(model)
    assert type(model[0].weight) is nn.Parameter  # untouched


# ------------------------------------------------------------------------------------------ GPU
def _mlp(dtype, device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 40))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.mul_(nm_mask(layer.weight.abs(), 2, 4))
    return model.to(device=device, dtype=dtype)


@requires_gpu
@pytest.mark.parametrize("layout", ["cutlass", "cusparselt"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparsify_runs_sparse_and_matches_the_dense_masked_model(layout, dtype):
    model = _mlp(dtype, "cuda")
    x = torch.randn(2048, 256, device="cuda", dtype=dtype)
    with torch.no_grad():
        expected = model(x)
        outcome = sparsify_(model, layout)
        got = model(x)
    assert outcome["0"] is None and outcome["2"] is None
    assert "rows % 32" in outcome["4"]  # 40 output rows: left dense, with its reason
    assert isinstance(model[0].weight, torch.sparse.SparseSemiStructuredTensor)
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cusparselt_packing_is_the_librarys_compress(dtype):
    w = random_24(256, 512, dtype, seed=9, degenerate=0.0, device="cuda")
    packed = pack_24(w, "cusparselt")
    reference = torch._cslt_compress(w)
    assert torch.equal(packed.packed.view(torch.int16), reference.view(torch.int16))
    x = torch.randn(512, 128, device="cuda", dtype=dtype)
    torch.testing.assert_close(torch.mm(packed, x), torch.mm(w, x), rtol=2e-2, atol=2e-2)


@requires_gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_mask", [False, True])
def test_extension_kernel_equals_the_torch_twin_on_gpu(dtype, with_mask):
    from unipruning.packing import extension

    if extension() is None:
        pytest.skip("unipruning._C is not built (UNIPRUNING_BUILD_CUDA=1)")
    w = random_24(1024, 2048, dtype, seed=11, device="cuda")
    mask = nm_mask(torch.rand(1024, 2048, device="cuda"), 2, 4) if with_mask else None
    if with_mask:
        w = torch.randn(1024, 2048, device="cuda", dtype=dtype)
    values, meta = torch.ops.unipruning.pack24_cutlass(w, mask)
    ref_values, ref_meta = pack_cutlass_torch(w, mask)
    assert torch.equal(bits(values), bits(ref_values)) and torch.equal(meta, ref_meta)
    with pytest.raises(RuntimeError, match="2:4"):
        torch.ops.unipruning.pack24_cutlass(torch.ones_like(w), None)

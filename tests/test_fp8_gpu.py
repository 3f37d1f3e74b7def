"""FP8 + 2:4 on a Hopper GPU against torchao's CUTLASS kernels: what the CPU tests (test_fp8.py) cannot
check. Skipped, with the reason, without a 9.x GPU, torchao (the `fp8` extra) or its CUDA extension.

Not yet run: no GPU was lent since this was written (the prototype it comes from was not run on one either).
"""

import pytest
import torch

from tests.test_fp8 import random_24
from unipruning.packing import fp8 as P

CUDA = torch.device("cuda")
WHY = P.sparse_support(CUDA) if torch.cuda.is_available() else "needs a CUDA GPU"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(WHY is not None, reason=str(WHY))]
SHAPES = [(8, 32), (40, 96), (64, 128), (1024, 1024), (4096, 1024)]


def sqnr(ref, got) -> float:
    ref, got = ref.float(), got.float()
    return (10 * torch.log10(ref.pow(2).mean() / (got - ref).pow(2).mean().clamp_min(1e-30))).item()


def stored(rows, cols, seed=0):
    q, scale = P.quantize_rowwise(random_24(rows, cols, seed=seed).to(CUDA))
    values, meta = P.pack_fp8_24(q)
    return q, scale, values, meta


@pytest.mark.parametrize("rows,cols", SHAPES)
def test_loaded_weight_dequantizes_to_the_stored_one(rows, cols):
    q, scale, values, meta = stored(rows, cols)
    weight = P.fp8_24_weight(P.unpack_fp8_24(values, meta), scale, torch.bfloat16)
    assert tuple(weight.qdata.shape) == (rows, cols // 2)
    # torchao dequantizes through the sparse kernel (a product with the identity): one product per entry
    assert torch.equal(weight.dequantize(torch.bfloat16), P.dequantize(values, meta, scale))


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("tokens", [1, 16, 200])
def test_sparse_kernel_matches_the_emulation(rows, cols, tokens):
    q, scale, values, meta = stored(rows, cols, seed=tokens)
    x = torch.randn(tokens, cols, device=CUDA, dtype=torch.bfloat16)
    got = torch.nn.functional.linear(x, P.fp8_24_weight(q, scale, torch.bfloat16))
    assert sqnr(P.emulate_linear(x, values, meta, scale), got) > 35  # accumulation order and bf16 rounding only


def test_torchao_quantize_gives_the_bits_of_the_stored_path():
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    from torchao.quantization.quantize_.workflows import Float8PackingFormat

    w = random_24(256, 512).to(CUDA)
    layer = torch.nn.Linear(512, 256, bias=False, device=CUDA, dtype=torch.bfloat16)
    layer.weight.data.copy_(w)
    quantize_(layer, Float8DynamicActivationFloat8WeightConfig(
        granularity=PerRow(), packing_format=Float8PackingFormat.SPARSE_2D_DATA_2D_METADATA))
    q, scale = P.quantize_rowwise(w)
    ours = P.fp8_24_weight(q, scale, torch.bfloat16)
    assert torch.equal(layer.weight.qdata.view(torch.uint8), ours.qdata.view(torch.uint8))
    assert torch.equal(layer.weight.sparse_metadata, ours.sparse_metadata)
    assert torch.equal(layer.weight.scale, ours.scale)


def test_3d_inputs_run_through_the_flattening_forward():
    q, scale, _, _ = stored(256, 512)
    layer = torch.nn.Linear(512, 256, bias=True, device=CUDA, dtype=torch.bfloat16)
    bias = layer.bias.detach().clone()
    weight = P.fp8_24_weight(q, scale, torch.bfloat16)
    P.swap_linear_(layer, weight)
    x = torch.randn(2, 5, 512, device=CUDA, dtype=torch.bfloat16)
    flat = torch.nn.functional.linear(x.reshape(10, 512), weight, bias).reshape(2, 5, 256)
    assert torch.equal(layer(x), flat)


def test_whole_model_from_an_exported_checkpoint(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        for seed, (name, m) in enumerate(model.named_modules()):
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                m.weight.copy_(0.05 * random_24(*m.weight.shape, seed=seed))
    model.save_pretrained(tmp_path / "src")
    P.export_fp8_24(str(tmp_path / "src"), str(tmp_path / "fp8"))
    sparse = P.load_fp8_24(str(tmp_path / "fp8"), CUDA)
    reference = P.load_fp8_24(str(tmp_path / "fp8"), CUDA, mode="reference")
    ids = torch.randint(0, 512, (2, 64), device=CUDA)
    with torch.no_grad():
        got = sparse(ids).logits
        assert sqnr(reference(ids).logits, got) > 20  # the activations' FP8 rounding is the only difference
        assert sqnr(model.to(CUDA)(ids).logits, got) > 15

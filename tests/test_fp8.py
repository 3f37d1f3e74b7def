"""FP8 + 2:4 checkpoints (packing/fp8.py), everything that runs on a CPU: the stored format, the scales
against torchao's, what is refused and why, the reference load, and the sparse load's wiring with torchao's
CUDA compressor replaced by a CPU stand-in. The kernel itself: tests/test_fp8_gpu.py (a 9.x GPU).

Tests that compare with torchao skip with the reason when it is not installed (`pip install 'unipruning[fp8]'`);
the format and the export need no torchao."""

import json
import os

import pytest
import torch

from tests._utils import make_checkpoint, prunable, read_all
from unipruning import UsageError, load_packed
from unipruning.cli import main
from unipruning.packing import fp8 as P

FP8 = torch.float8_e4m3fn
SMALL = ["--nsamples", "4", "--seqlen", "32"]


def torchao_or_skip():
    return pytest.importorskip("torchao", reason="torchao is not installed: pip install 'unipruning[fp8]'")


def random_24(rows, cols, dtype=torch.bfloat16, seed=0):
    """A weight whose 2 largest-magnitude entries of every 4 are kept (a 2:4-pruned checkpoint's look)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    groups = w.reshape(rows, cols // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, -1).indices, True)
    return torch.where(keep, groups, torch.zeros((), dtype=dtype)).reshape(rows, cols)


# ----------------------------------------------------------------------------------------- the format
@pytest.mark.parametrize("rows,cols", [(8, 32), (64, 128), (40, 96)])
def test_pack_unpack_round_trip_is_bit_exact(rows, cols):
    q, _ = P.quantize_rowwise(random_24(rows, cols, seed=rows))
    q[0, :4] = 0  # a group without a non-zero
    q[1, 4:8] = torch.tensor([0, 0, 0, 1.5]).to(FP8)  # one non-zero, at position 3
    q[2, 8:12] = torch.tensor([-0.0, 0, 2.0, 0]).to(FP8)  # a negative zero is a zero
    values, meta = P.pack_fp8_24(q)
    assert values.dtype == FP8 and values.shape == (rows, cols // 2)
    assert meta.dtype == torch.uint8 and meta.shape == (rows, cols // 8)
    back = P.unpack_fp8_24(values, meta)
    assert torch.equal(back.float(), q.float())
    nonzero = q.float() != 0
    assert torch.equal(back.view(torch.uint8)[nonzero], q.view(torch.uint8)[nonzero])


def test_metadata_nibbles_are_the_documented_layout():
    q = torch.zeros(8, 32, dtype=FP8)
    q[0, 0:8] = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1]).to(FP8)  # group 0 keeps (1, 3), group 1 keeps (0, 3)
    q[0, 8:12] = torch.tensor([0, 0, 0, 0]).to(FP8)  # group 2: nothing kept, filled at (2, 3)
    _, meta = P.pack_fp8_24(q)
    assert meta[0, 0].item() == (1 | 3 << 2) | ((0 | 3 << 2) << 4)
    assert meta[0, 1].item() & 0xF == 2 | 3 << 2


def test_scales_are_row_amax_over_448_and_zero_rows_get_one():
    w = random_24(16, 64, torch.float32, seed=1)
    w[5] = 0
    q, scale = P.quantize_rowwise(w)
    assert scale.shape == (16, 1) and scale.dtype == torch.float32 and scale[5].item() == 1.0
    expected = w.abs().amax(1, keepdim=True) / 448
    assert torch.equal(scale[torch.arange(16) != 5], expected[torch.arange(16) != 5])
    assert q.float().abs().amax(1)[0].item() == 448.0  # each row's largest entry hits the top code
    assert not q.float().isnan().any() and not ((q.float() != 0) & (w == 0)).any()  # zeros stay zeros


def test_rowwise_codes_and_scales_match_torchao_bit_for_bit():
    torchao_or_skip()
    from torchao.quantization import Float8Tensor, PerRow

    w = random_24(64, 128)
    q, scale = P.quantize_rowwise(w)
    ref = Float8Tensor.from_hp(w, granularity=PerRow())
    assert torch.equal(scale, ref.scale)
    assert torch.equal(q.view(torch.uint8), ref.qdata.view(torch.uint8))
    w[3] = 0  # where torchao's scale is 0 and its codes NaN: ours are scale 1 and zeros
    assert Float8Tensor.from_hp(w, granularity=PerRow()).qdata[3].float().isnan().all()


def test_emulated_kernel_tracks_the_bf16_linear():
    w = random_24(256, 512)
    x = torch.randn(3, 7, 512).to(torch.bfloat16)
    q, scale = P.quantize_rowwise(w)
    values, meta = P.pack_fp8_24(q)
    out = P.emulate_linear(x, values, meta, scale)
    ref = torch.nn.functional.linear(x.float(), w.float())
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (out.float() - ref).pow(2).mean())
    assert out.shape == (3, 7, 256) and out.dtype == torch.bfloat16
    assert sqnr > 25, f"SQNR {sqnr:.1f} dB"  # e4m3 (3 mantissa bits) on both operands


# ------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("weight,needle", [
    (torch.ones(8, 32, dtype=torch.bfloat16), "not 2:4"),
    (random_24(12, 32), "rows % 8"),
    (random_24(8, 48), "cols % 32"),
    (torch.zeros(8, 32, dtype=torch.int8), "expected float16"),
    (random_24(8, 32).to(FP8), "expected float16"),
    (torch.zeros(64), "2-D"),
])
def test_skip_reason_names_the_problem(weight, needle):
    assert needle in P.skip_reason(weight)


def test_non_finite_weights_stay_dense():
    w = random_24(8, 32)
    w[0, 0] = float("nan")
    assert "NaN" in P.skip_reason(w) and P.skip_reason(random_24(8, 64, torch.float32)) is None


# ------------------------------------------------------------------------------ export, then load
@pytest.fixture(scope="module")
def pruned_24(tmp_path_factory, text_file):
    """A bf16 Llama with shapes the kernel takes (hidden 64, MLP 128), pruned 2:4 by the CLI."""
    source = make_checkpoint(tmp_path_factory.mktemp("fp8src"), dtype=torch.bfloat16, hidden=64, intermediate=128)
    out = tmp_path_factory.mktemp("fp8runs") / "pruned"
    assert main(["prune", "--model", source, "--out", str(out), "--pattern", "2:4", "--calib", text_file,
                 *SMALL, "--quiet"]) == 0
    return str(out)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, pruned_24):
    out = tmp_path_factory.mktemp("fp8out") / "model"
    assert main(["pack", "--model", pruned_24, "--out", str(out), "--format", "fp8-2:4", "--quiet"]) == 0
    return str(out)


def test_export_writes_the_documented_format(exported, pruned_24):
    dense, names = read_all(pruned_24), set(prunable(pruned_24))
    with open(os.path.join(exported, "config.json")) as f:
        entry = json.load(f)[P.CONFIG_KEY]
    assert entry["format_version"] == 1 and entry["dtype"] == "bfloat16" and set(entry["packed"]) == names
    stored, stored_bytes = read_all(exported), 0  # the pruned checkpoint's shards, one per block
    for name in names:
        assert {name + P.VALUES, name + P.META, name + P.SCALE} <= set(stored) and name not in stored
        values, meta, scale = (stored[name + s] for s in (P.VALUES, P.META, P.SCALE))
        rows, cols = dense[name].shape
        assert values.dtype == FP8 and meta.dtype == torch.uint8 and scale.shape == (rows, 1)
        q, expected = P.quantize_rowwise(dense[name])
        assert torch.equal(scale, expected) and torch.equal(P.unpack_fp8_24(values, meta).float(), q.float())
        stored_bytes += rows * (cols // 2 + cols // 8 + 4)
    for name in set(stored) - {n + s for n in names for s in (P.VALUES, P.META, P.SCALE)}:
        assert torch.equal(stored[name], dense[name]), name  # bf16 already: copied as it is
    with open(os.path.join(exported, "model.safetensors.index.json")) as f:
        assert set(json.load(f)["weight_map"]) == set(stored)
    with open(os.path.join(exported, P.REPORT)) as f:
        report = json.load(f)
    assert report["bytes_stored"] == stored_bytes
    assert report["bytes_bf16"] == sum(dense[n].numel() * 2 for n in names)
    assert os.path.isfile(os.path.join(exported, "tokenizer.json"))


def test_reference_load_gives_the_dequantized_weights_and_runs(exported, pruned_24):
    from transformers import AutoModelForCausalLM

    dense = read_all(pruned_24)
    model = P.load_fp8_24(exported, "cpu", mode="reference")
    for name, param in model.named_parameters():
        if name in set(prunable(pruned_24)):
            q, scale = P.quantize_rowwise(dense[name])
            assert torch.equal(param, (q.float() * scale).to(torch.bfloat16)), name
            assert torch.equal(param == 0, dense[name] == 0), name  # still 2:4
        else:
            assert torch.equal(param, dense[name]), name
    ids = torch.randint(0, 400, (2, 16))
    source = AutoModelForCausalLM.from_pretrained(pruned_24, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref, got = source(ids).logits.float(), model(ids).logits.float()
    assert 10 * torch.log10(ref.pow(2).mean() / (got - ref).pow(2).mean()) > 15  # FP8 weights only


def test_sparse_load_without_a_hopper_gpu_is_one_line(exported):
    for call in (lambda: P.load_fp8_24(exported, "cpu"), lambda: load_packed(exported, device="cpu")):
        with pytest.raises(UsageError, match="compute capability 9.x") as info:
            call()
        assert "\n" not in str(info.value) and "mode='reference'" in str(info.value)


def test_sparse_load_wiring_with_a_cpu_stand_in_compressor(exported, pruned_24, monkeypatch):
    """torchao's CUDA compressor replaced by a CPU stand-in: which modules get torchao's tensor, with which
    scale, block size and activation quantization, and the 2-D forward (the kernel needs a GPU)."""
    torchao_or_skip()
    import torchao.ops
    from torchao.quantization import PerRow
    from torchao.quantization.quantize_.workflows import Float8Sparse2x4_2DData2DMetadataTensor

    seen = []

    def stand_in(q):
        seen.append(q.shape)
        return P.pack_fp8_24(q)[0], torch.zeros(max(q.shape[0], 64), 16, dtype=torch.uint8)

    monkeypatch.setattr(torchao.ops, "to_sparse_semi_structured_cutlass_sm9x_f8", stand_in)
    monkeypatch.setattr(P, "sparse_support", lambda device: None)
    model = P.load_fp8_24(exported, "cpu")
    names = prunable(pruned_24)
    assert len(seen) == len(names)
    layer = model.model.layers[1].mlp.down_proj
    w = layer.weight
    assert isinstance(w, Float8Sparse2x4_2DData2DMetadataTensor) and not w.requires_grad
    assert w.shape == (64, 128) and w.dtype == torch.bfloat16 and w.block_size == [1, 128]
    assert w.act_quant_kwargs.float8_dtype == FP8 and isinstance(w.act_quant_kwargs.granularity, PerRow)
    _, scale = P.quantize_rowwise(read_all(pruned_24)["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(w.scale, scale) and layer.forward.__func__ is P._flat_forward
    assert type(model.lm_head.weight) is torch.nn.Parameter


def test_export_refusals_are_one_line(pruned_24, tmp_path, capsys, tiny_llama):
    cases = [
        (["pack", "--model", pruned_24, "--out", tmp_path / "a", "--format", "fp8-2:4", "--dtype", "float32"],
         "invalid choice"),
        (["pack", "--model", tiny_llama, "--out", tmp_path / "b", "--format", "fp8-2:4"], "no 2:4 matrix"),
        (["pack", "--model", pruned_24, "--out", tmp_path / "c", "--format", "fp8"], "invalid choice"),
    ]
    for argv, needle in cases:
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
    with pytest.raises(UsageError, match="not an FP8"):
        P.load_fp8_24(pruned_24, "cpu", mode="reference")
    assert not any(p.exists() for p in (tmp_path / "a", tmp_path / "b", tmp_path / "c"))

"""`unipruning pack` and `load_packed`: a 2:4 checkpoint packed to 9/16 of its dense bytes and rebuilt as
a sparse model without densifying a layer."""

import json
import os

import pytest
import torch
from torch.sparse import SparseSemiStructuredTensorCUTLASS

from tests._utils import make_checkpoint, prunable, read_all, requires_gpu
from unipruning import load_packed, unpack_24
from unipruning.cli import main

SMALL = ["--nsamples", "4", "--seqlen", "32"]


def run_cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def pruned_24(tmp_path_factory, text_file):
    """A bf16 Llama with packable shapes (hidden 64, MLP 128, k/v rows 32), pruned 2:4 by the CLI."""
    source = make_checkpoint(tmp_path_factory.mktemp("src24"), dtype=torch.bfloat16, hidden=64, intermediate=128)
    out = tmp_path_factory.mktemp("runs24") / "pruned"
    assert run_cli("prune", "--model", source, "--out", out, "--pattern", "2:4", "--calib", text_file, *SMALL) == 0
    return str(out)


@pytest.fixture(scope="module")
def packed(tmp_path_factory, pruned_24):
    out = tmp_path_factory.mktemp("packed") / "model"
    assert run_cli("pack", "--model", pruned_24, "--out", out) == 0
    return str(out)


def test_packed_checkpoint_holds_values_and_metadata_at_9_16_of_the_dense_bytes(packed, pruned_24):
    dense, stored = read_all(pruned_24), read_all(packed)
    names = prunable(pruned_24)
    dense_bytes = packed_bytes = 0
    for name in names:
        assert name not in stored
        values, meta = stored[name + "_packed"], stored[name + "_meta"]
        rows, cols = dense[name].shape
        assert values.shape == (rows, cols // 2) and values.dtype == torch.bfloat16
        assert meta.shape == (rows, cols // 16) and meta.dtype == torch.int16
        dense_bytes += dense[name].numel() * 2
        packed_bytes += values.numel() * 2 + meta.numel() * 2
    assert packed_bytes * 16 == dense_bytes * 9
    for name, tensor in dense.items():  # everything else is copied bit for bit
        if name not in names:
            assert torch.equal(stored[name], tensor), name
    with open(os.path.join(packed, "config.json")) as f:
        entry = json.load(f)["unipruning_packed"]
    assert entry["layout"] == "cutlass" and entry["format_version"] == 1 and sorted(entry["packed"]) == sorted(names)
    with open(os.path.join(packed, "packing_report.json")) as f:
        assert json.load(f)["packed_fraction"] == 9 / 16
    for side in ("tokenizer.json", "generation_config.json", "LICENSE"):
        assert os.path.isfile(os.path.join(packed, side)), side


def test_load_packed_rebuilds_the_model_without_densifying(packed, pruned_24, monkeypatch):
    import unipruning.packing.packed as packing

    def forbidden(*_):
        raise AssertionError("a layer was densified while loading")

    monkeypatch.setattr(packing, "unpack_cutlass_torch", forbidden)
    model = load_packed(packed, device="cpu")
    monkeypatch.undo()
    dense = read_all(pruned_24)
    names = set(prunable(pruned_24))
    params = dict(model.named_parameters())
    for name in names:
        weight = params[name]
        assert isinstance(weight, SparseSemiStructuredTensorCUTLASS), name
        assert weight.packed.shape == (weight.shape[0], weight.shape[1] // 2)
        assert torch.equal(unpack_24(weight), dense[name]), name
    for name, param in params.items():
        if name not in names:
            assert torch.equal(param.detach(), dense[name]), name
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"


def test_pack_casts_with_dtype_and_refuses_float32_without_it(tmp_path, text_file, capsys):
    source = make_checkpoint(tmp_path / "src32", hidden=64, intermediate=128)
    pruned = tmp_path / "p"
    assert run_cli("prune", "--model", source, "--out", pruned, "--pattern", "2:4", "--calib", text_file, *SMALL) == 0
    capsys.readouterr()
    assert run_cli("pack", "--model", pruned, "--out", tmp_path / "no") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--dtype bfloat16" in err
    assert not os.path.exists(tmp_path / "no")
    assert run_cli("pack", "--model", pruned, "--out", tmp_path / "yes", "--dtype", "float16") == 0
    stored = read_all(tmp_path / "yes")
    assert stored["model.layers.0.mlp.up_proj.weight_packed"].dtype == torch.float16
    assert stored["model.norm.weight"].dtype == torch.float16


def test_pack_refuses_a_model_that_is_not_24(tmp_path, capsys):
    source = make_checkpoint(tmp_path / "dense", dtype=torch.bfloat16, hidden=64, intermediate=128)
    assert run_cli("pack", "--model", source, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert "no 2:4 matrix to pack" in err and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "out")


def test_pack_keeps_unpackable_shapes_dense_and_says_why(tmp_path, text_file, capsys):
    source = make_checkpoint(tmp_path / "odd", dtype=torch.bfloat16, hidden=64, intermediate=96)
    pruned = tmp_path / "p"
    assert run_cli("prune", "--model", source, "--out", pruned, "--pattern", "2:4", "--calib", text_file, *SMALL) == 0
    assert run_cli("pack", "--model", pruned, "--out", tmp_path / "packed") == 0
    out = capsys.readouterr().out
    assert "kept dense: model.layers.0.mlp.down_proj.weight: shape (64, 96)" in out
    model = load_packed(str(tmp_path / "packed"), device="cpu")
    assert type(model.model.layers[0].mlp.down_proj.weight) is torch.nn.Parameter
    assert isinstance(model.model.layers[0].mlp.up_proj.weight, SparseSemiStructuredTensorCUTLASS)


def test_load_packed_refuses_an_ordinary_checkpoint(pruned_24):
    from unipruning import UsageError

    with pytest.raises(UsageError, match="not a packed checkpoint"):
        load_packed(pruned_24, device="cpu")


@requires_gpu
@pytest.mark.parametrize("layout", ["cutlass", "cusparselt"])
def test_packed_model_runs_sparse_on_gpu_like_the_dense_pruned_model(packed, pruned_24, layout):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 400, (4, 64), device="cuda")
    dense = AutoModelForCausalLM.from_pretrained(pruned_24, dtype=torch.bfloat16).cuda().eval()
    sparse = load_packed(packed, device="cuda", layout=layout)
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids).logits, dense(ids).logits, rtol=5e-2, atol=5e-2)


def test_pack_and_load_a_sharded_checkpoint(pruned_24, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(pruned_24, dtype=torch.bfloat16)
    model.save_pretrained(sharded, max_shard_size="60KB")
    assert run_cli("pack", "--model", sharded, "--out", tmp_path / "packed") == 0
    with open(tmp_path / "packed" / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    stored = read_all(tmp_path / "packed")
    assert set(weight_map) == set(stored)  # the index names every packed and copied tensor
    for name, shard in weight_map.items():
        assert os.path.isfile(tmp_path / "packed" / shard), name
    dense = read_all(sharded)
    model = load_packed(str(tmp_path / "packed"), device="cpu")
    for name, param in model.named_parameters():
        got = unpack_24(param) if isinstance(param, SparseSemiStructuredTensorCUTLASS) else param.detach()
        assert torch.equal(got, dense[name]), name


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_pack_and_load_an_moe_checkpoint(family, tmp_path, text_file):
    """MoE checkpoints store experts one by one (transformers assembles them into 3-D parameters): the
    experts stay dense in the packed file and load_packed assembles them, the attention is packed."""
    from transformers import AutoModelForCausalLM

    from tests._utils import make_family_checkpoint

    source = make_family_checkpoint(tmp_path / "src", family, hidden_size=64, intermediate_size=128,
                                    **({"moe_intermediate_size": 64} if family == "qwen2_moe" else {}))
    pruned, packed = tmp_path / "pruned", tmp_path / "packed"
    assert run_cli("prune", "--model", source, "--out", pruned, "--pattern", "2:4", "--calib", text_file,
                   *SMALL) == 0
    assert run_cli("pack", "--model", pruned, "--out", packed, "--dtype", "bfloat16") == 0
    model = load_packed(str(packed), device="cpu")
    reference = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    sparse = [n for n, p in params.items() if isinstance(p, SparseSemiStructuredTensorCUTLASS)]
    assert any("self_attn" in n for n in sparse) and not any("experts" in n for n in sparse)
    for name, expected in reference.named_parameters():
        got = unpack_24(params[name]) if name in sparse else params[name].detach()
        assert torch.equal(got, expected.detach()), name
    assert any(p.dim() == 3 for p in params.values())  # the experts, assembled


def test_load_packed_without_cuda_is_one_line_and_a_cpu_build_is_inspection_only(packed, monkeypatch):
    from unipruning import UsageError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="sees no CUDA GPU here") as info:
        load_packed(packed, device="cuda")
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match="cuSPARSELt compresses there"):
        load_packed(packed, device="cpu", layout="cusparselt")
    model = load_packed(packed, device="cpu")  # built: its tensors can be read
    assert isinstance(model.model.layers[0].mlp.up_proj.weight, SparseSemiStructuredTensorCUTLASS)
    with pytest.raises(UsageError, match="cannot run it .*load it with device='cuda'") as info:
        model(torch.randint(0, 400, (1, 8)))
    assert "\n" not in str(info.value)

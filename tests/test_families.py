"""Every supported family, end to end through the CLI on tiny random checkpoints: exact counts per
prunable matrix (fused parts and expert slices each their own), +0.0 zeros, everything else bit-identical,
loadable by from_pretrained; block-by-block streaming equal to the whole model (per-type attention
kwargs of Gemma 2/3); fused equal to unfused; the MoE policy for experts calibration never routes to."""

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests._utils import FAMILY_CONFIGS, make_family_checkpoint, read_all, tokenizer, weight_files
from unipruning.algorithm.masks import keep_count
from unipruning.cli import main
from unipruning.data import calibration_windows
from unipruning.io.checkpoint import LazyCheckpoint, load_config
from unipruning.pipeline.inputs import experts_forward
from unipruning.pipeline.stream import capture_block_inputs

COMMON = ["--nsamples", "4", "--seqlen", "16"]
FAMILIES = list(FAMILY_CONFIGS)
# the stored tensors that hold prunable matrices, by an independent reading of each family's layout
STORED_PRUNABLE = {
    "opt": r"\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|fc1|fc2)\.weight$",
    "phi3": r"\.layers\.\d+\.(self_attn\.(qkv|o)_proj|mlp\.(gate_up|down)_proj)\.weight$",
    "mixtral": r"\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|block_sparse_moe\.experts\.\d+\.w[123])\.weight$",
}
_DEFAULT = (r"\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(shared_expert\.|experts\.\d+\.)?(gate|up|down)_proj)"
            r"\.weight$")
# rows of each logical part inside a fused stored tensor (Phi-3: 4 heads of 8 for q, 2 kv heads of 8)
PARTS = {"self_attn.qkv_proj.weight": (32, 16, 16), "mlp.gate_up_proj.weight": (64, 64)}


def _prunable_stored(model_type: str, names) -> list[str]:
    pattern = re.compile(STORED_PRUNABLE.get(model_type, _DEFAULT))
    return sorted(n for n in names if pattern.search(n))


def _pieces(model_type: str, name: str, tensor: torch.Tensor):
    """The logical matrices of a stored tensor (rows of fused Phi-3 tensors, else the tensor)."""
    suffix = next((s for s in PARTS if name.endswith(s)), None) if model_type == "phi3" else None
    if suffix is None:
        return [tensor]
    return list(tensor.split(PARTS[suffix]))


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    return request.param, make_family_checkpoint(directory / "model", request.param)


@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_prune_every_family_exact_counts_positive_zeros(family, pattern, tmp_path, text_file):
    model_type, source = family
    out = tmp_path / "out"
    # unstructured: one budget per matrix, the exact count checked below
    mask = ["--sparsity", pattern, "--allocation", "layer"] if ":" not in pattern else ["--pattern", pattern]
    assert main(["prune", "--model", source, "--out", str(out), "--calib", text_file, *COMMON, *mask]) == 0
    before, after = read_all(source), read_all(out)
    assert set(before) == set(after)
    prunable = _prunable_stored(model_type, before)
    assert prunable and all(after[n].dim() == 2 for n in prunable)
    for name, tensor in after.items():
        if name not in prunable:
            assert torch.equal(tensor, before[name]), f"{name} changed"
            continue
        zeros = tensor == 0
        assert not torch.signbit(tensor[zeros]).any(), f"{name}: negative zeros"
        assert torch.equal(tensor[~zeros], before[name][~zeros]), f"{name}: kept weights changed"
        for part in _pieces(model_type, name, tensor):
            if pattern == "2:4":
                groups = (part != 0).reshape(part.shape[0], -1, 4).sum(-1)
                assert bool((groups == 2).all()), name
            else:
                assert int((part != 0).sum()) == keep_count(0.5, part.numel()), name
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["total"]["prunable_params"] == sum(before[n].numel() for n in prunable)
    reloaded = AutoModelForCausalLM.from_pretrained(out)  # transformers converts MoE layouts back on load
    assert reloaded.config.sparsity_config["pattern"] == ("2:4" if pattern == "2:4" else "unstructured")


def test_streamed_blocks_equal_the_whole_model(family, text_file):
    """Block-by-block outputs (captured kwargs per block: sliding and global layers of Gemma get their
    own masks) equal the hidden states of one whole-model forward."""
    model_type, source = family
    ids = calibration_windows(tokenizer(), text_file, 2, 24, seed=0)  # longer than Gemma's window of 8
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        stream = capture_block_inputs(model, [ids], torch.device("cpu"))
        layers = model.get_submodule("model.decoder.layers" if model_type == "opt" else "model.layers")
        for i, block in enumerate(layers[:-1]):
            stream.advance(block, i, 0)
            torch.testing.assert_close(stream.hidden[0], expected[i + 1], rtol=0, atol=1e-6)


def test_lazy_blocks_equal_transformers_loading(family):
    """Blocks read lazily (per-expert tensors assembled into 3-D parameters, renamed routers) equal
    what from_pretrained builds."""
    _, source = family
    checkpoint = LazyCheckpoint(source, load_config(source))
    skeleton = checkpoint.skeleton(torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    checkpoint.load_block(skeleton, 1, torch.device("cpu"), torch.float32)
    ours = {n: p for n, p in skeleton.named_parameters() if not p.is_meta}
    theirs = dict(reference.named_parameters())
    assert any(".1." in n for n in ours)
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


def test_fused_phi3_prunes_like_the_same_weights_unfused(tmp_path, text_file):
    """Phi-3's qkv_proj/gate_up_proj are scored, normalised and masked as q, k, v / gate, up: the same
    weights in a Llama (separate projections) get the same masks (ria: no name-keyed random subsets)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    phi = make_family_checkpoint(tmp_path / "phi3", "phi3", layers=1)
    fused = AutoModelForCausalLM.from_pretrained(phi, dtype=torch.float32)
    cfg = fused.config
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, rms_norm_eps=cfg.rms_norm_eps,
                                         rope_parameters=cfg.rope_parameters, bos_token_id=0, eos_token_id=1))
    src, dst = fused.model.layers[0], llama.model.layers[0]
    with torch.no_grad():
        q, k, v = src.self_attn.qkv_proj.weight.split((32, 16, 16))
        gate, up = src.mlp.gate_up_proj.weight.split((64, 64))
        for lin, w in ((dst.self_attn.q_proj, q), (dst.self_attn.k_proj, k), (dst.self_attn.v_proj, v),
                       (dst.self_attn.o_proj, src.self_attn.o_proj.weight), (dst.mlp.gate_proj, gate),
                       (dst.mlp.up_proj, up), (dst.mlp.down_proj, src.mlp.down_proj.weight)):
            lin.weight.copy_(w)
        for a, b in ((llama.model.embed_tokens, fused.model.embed_tokens), (llama.lm_head, fused.lm_head),
                     (llama.model.norm, fused.model.norm), (dst.input_layernorm, src.input_layernorm),
                     (dst.post_attention_layernorm, src.post_attention_layernorm)):
            a.weight.copy_(b.weight)
    llama.save_pretrained(tmp_path / "llama")
    tokenizer().save_pretrained(tmp_path / "llama")
    for name, path in (("phi", phi), ("llama", tmp_path / "llama")):
        assert main(["prune", "--model", str(path), "--out", str(tmp_path / f"out-{name}"), "--calib", text_file,
                     *COMMON, "--metric", "ria", "--sparsity", "0.6"]) == 0
    a, b = read_all(tmp_path / "out-phi"), read_all(tmp_path / "out-llama")
    pre = "model.layers.0."
    qkv = torch.cat([b[pre + f"self_attn.{x}_proj.weight"] for x in "qkv"])
    gate_up = torch.cat([b[pre + "mlp.gate_proj.weight"], b[pre + "mlp.up_proj.weight"]])
    pairs = [(a[pre + "self_attn.qkv_proj.weight"], qkv), (a[pre + "mlp.gate_up_proj.weight"], gate_up),
             (a[pre + "self_attn.o_proj.weight"], b[pre + "self_attn.o_proj.weight"]),
             (a[pre + "mlp.down_proj.weight"], b[pre + "mlp.down_proj.weight"])]
    for fused_w, split_w in pairs:
        assert torch.equal(fused_w != 0, split_w != 0)


def test_experts_forward_is_bit_identical_to_transformers(tmp_path):
    source = make_family_checkpoint(tmp_path / "m", "qwen2_moe", layers=1)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    moe = model.model.layers[0].mlp
    x = torch.randn(40, 32)
    _, weights, index = moe.gate(x)
    seen = []
    ours = experts_forward(moe.experts, lambda e, kind, t: seen.append((e, kind, t.shape[0])))(x, index, weights)
    assert torch.equal(ours, moe.experts(x, index, weights))
    routed = {int(e) for e in index.unique()}
    assert {e for e, kind, _ in seen if kind == "in"} == routed
    assert sum(n for e, kind, n in seen if kind == "in") == index.numel()


def test_experts_never_routed_keep_z_zero_and_are_cut_by_magnitude(tmp_path, text_file):
    """Top-1 routing over 8 experts with 16 calibration tokens: some experts of block 0 never receive a
    token. The report lists exactly those (found independently from the router), their z is 0 and their
    masks keep the largest |W|."""
    source = make_family_checkpoint(tmp_path / "m", "mixtral", layers=1, num_local_experts=8,
                                    num_experts_per_tok=1)
    out = tmp_path / "out"
    assert main(["prune", "--model", source, "--out", str(out), "--calib", text_file, "--nsamples", "1",
                 "--seqlen", "16", "--sparsity", "0.5", "--allocation", "layer"]) == 0  # magnitude per matrix
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    ids = calibration_windows(tokenizer(), text_file, 1, 16, seed=0)
    routed = set()
    hook = model.model.layers[0].mlp.gate.register_forward_hook(lambda m, a, o: routed.update(o[2].flatten().tolist()))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    hook.remove()
    never = sorted(set(range(8)) - routed)
    assert never, "the test needs an expert that is never routed to"
    report = json.loads((out / "pruning_report.json").read_text())
    listed = report["unseen_matrices"]["matrices"]
    assert sorted({int(re.search(r"\[(\d+)\]", n).group(1)) for n in listed}) == never
    saliency, before, after = read_all(out / "saliency"), read_all(source), read_all(out)
    for e in never:
        assert not saliency[f"model.layers.0.mlp.experts.down_proj[{e}].z"].any()
        w = before[f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight"]
        kept = after[f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight"] != 0
        assert w.abs()[kept].min() >= w.abs()[~kept].max()


def test_unsupported_families_for_reconstruction_are_refused(tmp_path, text_file, capsys):
    source = make_family_checkpoint(tmp_path / "m", "mixtral", layers=1)
    assert main(["prune", "--model", source, "--out", str(tmp_path / "o"), "--calib", text_file, *COMMON,
                 "--reconstruct", "obs"]) == 2
    assert "--reconstruct obs supports" in capsys.readouterr().err


def test_opt_dead_relu_columns_tie_deterministically_on_every_backend(tmp_path, text_file):
    """OPT's fc2 reads a ReLU output: units that never fire give all-zero input columns (n_j = 0, a whole
    column of equal scores). Ties fall to |W| then the index: torch and Triton write the same bytes."""
    from safetensors.torch import load_file, save_file

    source = make_family_checkpoint(tmp_path / "m", "opt", layers=1)
    path = f"{source}/model.safetensors"
    tensors = load_file(path)
    tensors["model.decoder.layers.0.fc1.bias"][:16] = -1e4  # units 0..15 never fire
    save_file(tensors, path, metadata={"format": "pt"})
    outs = []
    for backend in ("torch", "triton"):
        out = tmp_path / backend
        assert main(["prune", "--model", source, "--out", str(out), "--calib", text_file, *COMMON,
                     "--metric", "wanda", "--sparsity", "0.3", "--backend", backend]) == 0
        outs.append(weight_files(out))
    assert outs[0] == outs[1]
    fc2 = read_all(tmp_path / "torch")["model.decoder.layers.0.fc2.weight"]
    assert not fc2[:, :16].any(), "dead input columns score 0 and go first"

"""Layer streaming: the lazy checkpoint path (prune on a directory) holds one block at a time and
learns the same saliency as the in-memory path."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests._utils import make_checkpoint, read_all, tokenizer
from unipruning import MaskSpec, PruneConfig, prune
from unipruning.cli import main
from unipruning.data import calibration_windows
from unipruning.models import decoder_blocks, load_config
from unipruning.stream import LazyCheckpoint


@pytest.mark.parametrize("dtype,tie", [(torch.float32, False), (torch.bfloat16, True)])
def test_lazy_prune_equals_in_memory_prune(tmp_path, text_file, dtype, tie):
    source = make_checkpoint(tmp_path / "model", dtype=dtype, tie=tie, layers=3)
    out = tmp_path / "out"
    assert main(["prune", "--model", source, "--out", str(out), "--calib", text_file, "--nsamples", "6",
                 "--seqlen", "32", "--sparsity", "0.6"]) == 0
    windows = calibration_windows(tokenizer(), text_file, 6, 32, seed=0)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    result = prune(model, windows, PruneConfig(mask=MaskSpec(sparsity=0.6)))
    lazy = read_all(out / "saliency")
    for name, z in result.saliency.z.items():
        assert torch.equal(lazy[f"{name}.z"], z), name


def test_only_one_block_is_ever_materialised(tmp_path, text_file, monkeypatch):
    source = make_checkpoint(tmp_path / "model", layers=4)
    seen = []
    real_load = LazyCheckpoint.load_block

    def load_block(self, model, index, device, dtype):
        real = [i for i, b in enumerate(decoder_blocks(model)) if not next(b.parameters()).is_meta]
        seen.append((index, real))
        return real_load(self, model, index, device, dtype)

    monkeypatch.setattr(LazyCheckpoint, "load_block", load_block)
    assert main(["prune", "--model", source, "--out", str(tmp_path / "out"), "--calib", text_file,
                 "--nsamples", "2", "--seqlen", "16"]) == 0
    assert seen == [(0, []), (1, []), (2, []), (3, [])]


def test_skeleton_rebuilds_computed_buffers_and_ties(tmp_path):
    source = make_checkpoint(tmp_path / "model", tie=True)
    checkpoint = LazyCheckpoint(source, load_config(source))
    model = checkpoint.skeleton(torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
    assert all(p.is_meta for p in decoder_blocks(model).parameters())
    block = checkpoint.load_block(model, 1, torch.device("cpu"), torch.float32)
    for a, b in zip(block.parameters(), reference.model.layers[1].parameters(), strict=True):
        assert torch.equal(a, b)
    checkpoint.release_block(model, 1)
    assert all(p.is_meta for p in decoder_blocks(model)[1].parameters())

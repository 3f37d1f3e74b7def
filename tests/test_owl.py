"""Outlier-aware allocation (`--allocation owl`): per-block sparsities from the saliency's outlier ratio,
within +-lambda of the target, the total exactly the target's, recorded in the report."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests._utils import make_checkpoint, read_all, tokenizer
from unipruning import MaskSpec, PruneConfig, UsageError, prune
from unipruning.algorithm.masks import block_of, keep_count, owl_block_sparsities, owl_counts
from unipruning.cli import main
from unipruning.data import calibration_windows


def test_block_sparsities_follow_the_outlier_ratio_and_average_to_the_target():
    spec = MaskSpec(sparsity=0.6, allocation="owl", owl_m=3.0, owl_lambda=0.1)
    gen = torch.Generator().manual_seed(0)
    z = {f"model.layers.{b}.mlp.{p}.weight": torch.rand(8, 16, generator=gen) for b in range(3) for p in ("a", "b")}
    z["model.layers.2.mlp.a.weight"][0, :8] = 40.0  # block 2 has the most outliers, block 0 none
    z["model.layers.1.mlp.a.weight"][0, :2] = 40.0
    s = owl_block_sparsities(z, list(z), spec)
    assert s[2] < s[1] < s[0]  # more outliers: kept denser
    assert max(abs(v - 0.6) for v in s.values()) == pytest.approx(0.1)  # the bound, reached
    assert sum(s.values()) / 3 == pytest.approx(0.6, abs=1e-12)
    counts, _ = owl_counts(z, {n: t.numel() for n, t in z.items()}, list(z), spec)
    assert sum(counts.values()) == keep_count(0.6, sum(t.numel() for t in z.values()))
    for name, count in counts.items():
        assert abs(count - (1 - s[block_of(name)]) * z[name].numel()) <= 1


def test_owl_refuses_what_it_cannot_do():
    with pytest.raises(UsageError, match="cannot be combined with an N:M pattern"):
        MaskSpec(pattern="2:4", allocation="owl")
    with pytest.raises(UsageError, match="`owl_lambda`"):
        MaskSpec(sparsity=0.95, allocation="owl", owl_lambda=0.08)


@pytest.fixture(scope="module")
def owl_pruned(tmp_path_factory, text_file):
    """(a 3-block checkpoint, its prune at 0.6 with allocation owl)."""
    base = tmp_path_factory.mktemp("owl")
    source, pruned = make_checkpoint(base / "model", layers=3), base / "p"
    assert main(["prune", "--model", source, "--out", str(pruned), "--calib", text_file, "--nsamples", "4",
                 "--seqlen", "32", "--sparsity", "0.6", "--allocation", "owl"]) == 0
    return source, pruned


def test_prune_and_mask_with_owl_write_the_same_bytes(owl_pruned, tmp_path):
    (source, pruned), masked = owl_pruned, tmp_path / "m"
    assert main(["mask", "--model", source, "--saliency", str(pruned / "saliency"), "--out", str(masked),
                 "--sparsity", "0.6", "--allocation", "owl"]) == 0
    a, b = read_all(pruned), read_all(masked)
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    report = json.loads((pruned / "pruning_report.json").read_text())
    owl = report["mask"]["owl"]
    assert owl["m"] == 5.0 and owl["lambda"] == 0.08 and len(owl["block_sparsity"]) == 3
    assert all(abs(s - 0.6) <= 0.08 + 1e-12 for s in owl["block_sparsity"].values())
    total = report["total"]
    assert total["prunable_kept"] == keep_count(0.6, total["prunable_params"])


def test_owl_in_memory(tiny_llama, text_file):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    windows = calibration_windows(tokenizer(), text_file, 4, 32, seed=0)
    result = prune(model, windows, PruneConfig(mask=MaskSpec(sparsity=0.5, allocation="owl")))
    kept = sum(int(m.sum()) for m in result.masks.values())
    assert kept == keep_count(0.5, sum(m.numel() for m in result.masks.values()))


def test_owl_row_cuts_every_row_to_its_blocks_sparsity(owl_pruned, tmp_path):
    """owl-row: owl's block sparsities, each output row of the block's matrices keeping round((1 - s_b) * in);
    the report records the same block sparsities as owl's."""
    from unipruning.algorithm.masks import MaskCutter

    (source, owl), rows = owl_pruned, tmp_path / "rows"
    assert main(["mask", "--model", source, "--saliency", str(owl / "saliency"), "--out", str(rows),
                 "--sparsity", "0.6", "--allocation", "owl-row"]) == 0
    block_sparsity = json.loads((owl / "pruning_report.json").read_text())["mask"]["owl"]["block_sparsity"]
    report = json.loads((rows / "pruning_report.json").read_text())
    assert report["mask"]["owl"]["block_sparsity"] == block_sparsity
    assert len(set(block_sparsity.values())) == 3  # the blocks differ: rows are not cut to one sparsity
    weights = read_all(rows)
    assert len(report["matrices"]) == 3 * 7
    for name in report["matrices"]:
        kept = (weights[name] != 0).sum(dim=1)
        expected = keep_count(block_sparsity[str(block_of(name))], weights[name].shape[1])
        assert kept.tolist() == [expected] * weights[name].shape[0], name
    z = {n: torch.rand(4, 10, generator=torch.Generator().manual_seed(i)) for i, n in
         enumerate(f"model.layers.{b}.mlp.up_proj.weight" for b in range(2))}
    spec = MaskSpec(sparsity=0.5, allocation="owl-row")
    cut = MaskCutter(z, dict.fromkeys(z, spec), spec, "torch", weights=z)
    for name in z:  # the same rows as allocation row at the block's sparsity
        s_b = cut.block_sparsities[block_of(name)]
        row = MaskCutter(z, dict.fromkeys(z, MaskSpec(sparsity=s_b, allocation="row")),
                         MaskSpec(sparsity=s_b, allocation="row"), "torch", weights=z)
        assert torch.equal(cut(name, z[name]), row(name, z[name]))
    with pytest.raises(UsageError, match="not per row as `allocation` owl-row"):
        PruneConfig(mask=spec, reconstruct="obs", guide_alpha=1.0)

"""`--refine swaps` end to end (prune and mask on the tiny Llama): the output error of every matrix never
rises, every budget is kept exactly (per row, per N:M group, per matrix), the weights are only masked,
refinement comes before the OBS update, a killed run resumes to the same bytes, `mask --refine` writes what
`prune --refine` wrote, both backends give the same masks, and bad settings are one-line usage errors."""

import json
import os

import pytest
import torch

from tests._utils import dies_after, make_family_checkpoint, prunable, read_all
from unipruning import PruneConfig, UsageError, prune
from unipruning.cli import main
from unipruning.config import REFINE_ITERS, MaskConfig

SMALL = ["--nsamples", "8", "--seqlen", "32"]
RUNS = {
    "mask": [],
    "refine": ["--refine", "swaps"],  # allocation auto: owl-row, a budget per row
    "layer": ["--allocation", "layer", "--sparsity", "0.7"],
    "layer-refine": ["--allocation", "layer", "--sparsity", "0.7", "--refine", "swaps"],
    "nm": ["--pattern", "2:4"],
    "nm-refine": ["--pattern", "2:4", "--refine", "swaps"],
    "obs-refine": ["--refine", "swaps", "--reconstruct", "obs"],
}


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def report(directory) -> dict:
    with open(os.path.join(directory, "pruning_report.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama, text_file):
    base = tmp_path_factory.mktemp("refine")
    out = {}
    for key, extra in RUNS.items():
        out[key] = str(base / key)
        assert run_cli("prune", "--model", tiny_llama, "--out", out[key], "--calib", text_file, *SMALL, *extra) == 0
    return out


@pytest.mark.parametrize("key", ["refine", "layer-refine", "nm-refine", "obs-refine"])
def test_the_error_of_every_matrix_never_rises_and_swaps_happen(runs, tiny_llama, key):
    entry = report(runs[key])["refinement"]
    assert entry["iters"] == REFINE_ITERS and set(entry["matrices"]) == set(prunable(tiny_llama))
    errors = entry["matrices"].values()
    assert all(e["error_after"] <= e["error_before"] for e in errors)
    assert sum(e["swaps"] for e in errors) > 0
    assert sum(e["error_after"] for e in errors) < sum(e["error_before"] for e in errors)


@pytest.mark.parametrize("plain,refined,budget", [("mask", "refine", "row"), ("layer", "layer-refine", "matrix"),
                                                  ("nm", "nm-refine", "group")])
def test_every_budget_is_kept_exactly_and_weights_are_only_masked(runs, tiny_llama, plain, refined, budget):
    source, before, after = read_all(tiny_llama), read_all(runs[plain]), read_all(runs[refined])
    names = set(prunable(tiny_llama))
    changed = 0
    for key, tensor in after.items():
        if key not in names:
            assert torch.equal(tensor, before[key]), key
            continue
        keep, old = tensor != 0, before[key] != 0
        assert torch.equal(tensor, torch.where(keep, source[key], 0.0)), key  # kept entries as they were
        assert not torch.signbit(tensor[~keep]).any()
        if budget == "row":
            assert torch.equal(keep.sum(1), old.sum(1)), key
        elif budget == "group":
            groups, old_groups = keep.reshape(keep.shape[0], -1, 4).sum(2), old.reshape(old.shape[0], -1, 4).sum(2)
            assert torch.equal(groups, old_groups) and bool((groups == 2).all()), key
        else:
            assert int(keep.sum()) == int(old.sum()), key
        changed += int((keep != old).sum())
    assert changed > 0
    assert report(runs[refined])["total"]["prunable_kept"] == report(runs[plain])["total"]["prunable_kept"]


def test_refinement_runs_before_the_obs_update(runs, tiny_llama):
    """Block 0's q/k/v see the same input with or without the OBS update (the block's own input), so their
    refined masks are those of the refinement alone; the OBS update then changes the kept weights only."""
    refined, rebuilt, plain = read_all(runs["refine"]), read_all(runs["obs-refine"]), read_all(runs["mask"])
    first = [n for n in prunable(tiny_llama) if n.startswith("model.layers.0.self_attn.") and "o_proj" not in n]
    assert len(first) == 3
    for name in first:
        assert torch.equal(rebuilt[name] != 0, refined[name] != 0), name
        assert not torch.equal(rebuilt[name], refined[name]), name
    assert any(not torch.equal(refined[n] != 0, plain[n] != 0) for n in first)
    entry = report(runs["obs-refine"])
    assert entry["reconstruction"]["method"] == "obs" and entry["settings"]["refine"] == "swaps"


def test_mask_refine_equals_prune_refine(runs, tiny_llama, text_file, tmp_path):
    out = tmp_path / "remasked"
    assert run_cli("mask", "--model", tiny_llama, "--saliency", os.path.join(runs["refine"], "saliency"), "--out", out,
                   "--refine", "swaps", "--calib", text_file) == 0
    a, b = read_all(out), read_all(runs["refine"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert report(out)["refinement"]["matrices"] == report(runs["refine"])["refinement"]["matrices"]


def test_interrupted_refinement_resumes_to_the_same_bytes(runs, tiny_llama, text_file, tmp_path, monkeypatch):
    import unipruning.pipeline.reconstruct as recon

    out = tmp_path / "resumed"
    argv = ["prune", "--model", tiny_llama, "--out", out, "--calib", text_file, *SMALL, "--refine", "swaps"]
    original = dies_after(monkeypatch, recon, "refine_mask", 7)  # block 0's seven matrices are done and saved
    assert run_cli(*argv) == 130
    partial = [p for p in os.listdir(tmp_path) if p.startswith(".resumed.partial-")]
    assert len(partial) == 1 and os.listdir(tmp_path / partial[0] / ".recon") == ["block-00000.safetensors"]
    monkeypatch.setattr(recon, "refine_mask", original)
    assert run_cli(*argv) == 0
    a, b = read_all(out), read_all(runs["refine"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed = report(out)
    assert [blk["resumed"] for blk in resumed["refinement"]["blocks"]] == [True, False]
    assert resumed["refinement"]["matrices"] == report(runs["refine"])["refinement"]["matrices"]


@pytest.mark.slow  # about 60 s here (the Triton interpreter, 2 cores, 2026-12-03)
def test_triton_under_the_interpreter_refines_to_the_masks_of_torch(runs, tiny_llama, text_file, tmp_path):
    out = tmp_path / "triton"
    assert run_cli("mask", "--model", tiny_llama, "--saliency", os.path.join(runs["refine"], "saliency"), "--out", out,
                   "--refine", "swaps", "--calib", text_file, "--backend", "triton") == 0
    assert report(out)["settings"]["backend_used"] == "triton"
    a, b = read_all(out), read_all(runs["refine"])
    assert a.keys() == b.keys() and all(torch.equal(a[k] != 0, b[k] != 0) for k in a)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--refine", "swaps", "--refine-iters", "0"], "--refine-iters"),
        (["--refine", "swaps", "--refine-iters", "-3"], "--refine-iters"),
        (["--refine-iters", "5"], "pass --refine swaps"),
        (["--refine", "swaps", "--metric", "sparsegpt", "--reconstruct", "obs"], "--metric sparsegpt"),
        (["--refine", "swaps", "--reconstruct", "obs", "--guide-alpha", "1"], "--guide-alpha"),
        (["--refine", "shuffle"], "--refine"),
    ],
)
def test_bad_refine_settings(argv, needle, tiny_llama, text_file, tmp_path, capsys):
    assert run_cli("prune", "--model", tiny_llama, "--out", tmp_path / "o", "--calib", text_file, *argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not os.listdir(tmp_path)


def test_mask_refine_needs_calib(runs, tiny_llama, tmp_path, capsys):
    assert run_cli("mask", "--model", tiny_llama, "--saliency", os.path.join(runs["refine"], "saliency"),
                   "--out", tmp_path / "o", "--refine", "swaps") == 2
    err = capsys.readouterr().err.strip()
    assert "--refine swaps: pass --calib" in err and len(err.splitlines()) == 1


def test_refine_refuses_fused_matrices_in_one_line(tmp_path, text_file, capsys):
    phi = make_family_checkpoint(tmp_path / "phi3", "phi3", layers=1)
    assert run_cli("prune", "--model", phi, "--out", tmp_path / "o", "--calib", text_file, *SMALL, "--refine",
                   "swaps") == 2
    err = capsys.readouterr().err.strip()
    assert "--refine swaps supports models whose prunable matrices are whole linears" in err
    assert len(err.splitlines()) == 1 and not os.path.exists(tmp_path / "o")


def test_python_api_settles_refine_and_in_memory_prune_refuses_it():
    assert PruneConfig(refine="swaps").refine_iters == REFINE_ITERS
    assert MaskConfig(refine="swaps", refine_iters=3).refine_iters == 3
    assert "refine" not in PruneConfig().to_dict() and "refine_iters" not in PruneConfig().to_dict()
    assert PruneConfig(refine="swaps").to_dict()["refine_iters"] == REFINE_ITERS
    with pytest.raises(UsageError, match="prune_checkpoint"):
        prune(torch.nn.Module(), torch.zeros(1, 4, dtype=torch.long), PruneConfig(refine="swaps"))

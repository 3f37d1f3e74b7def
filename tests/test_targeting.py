"""Targeting (--targets, --ignore, --dense-layers, --recipe), --dry-run and the safety checks, through
the CLI on tiny checkpoints."""

import json
import os

import pytest
import torch

from tests._utils import make_checkpoint, make_family_checkpoint, read_all
from unipruning.algorithm.masks import keep_count
from unipruning.cli import main

COMMON = ["--nsamples", "4", "--seqlen", "16"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("t") / "model", layers=3)


@pytest.fixture(scope="module")
def saliency_run(model, tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("s") / "full"
    assert main(["prune", "--model", model, "--out", str(out), "--calib", text_file, *COMMON]) == 0
    return out


def _kept(directory) -> dict[str, int]:
    return {n: int((t != 0).sum()) for n, t in read_all(directory).items() if n.endswith("proj.weight")}


def test_ignore_and_dense_layers_are_honoured_exactly(model, tmp_path, text_file):
    out = tmp_path / "out"
    assert main(["prune", "--model", model, "--out", str(out), "--calib", text_file, *COMMON, "--sparsity", "0.6",
                 "--ignore", r"self_attn\.o_proj", "--dense-layers", "0,-1", "--allocation", "layer"]) == 0
    before, after = read_all(model), read_all(out)
    report = json.loads((out / "pruning_report.json").read_text())
    for name, tensor in after.items():
        dense = (".layers.0." in name or ".layers.2." in name or "o_proj" in name or not name.endswith("proj.weight"))
        if dense:
            assert torch.equal(tensor, before[name]), name
        else:
            assert int((tensor != 0).sum()) == keep_count(0.6, tensor.numel()), name
    pruned = sorted(report["matrices"])
    assert pruned == sorted(n for n in after if ".layers.1." in n and n.endswith("proj.weight") and "o_proj" not in n)
    assert report["skipped"]["model.layers.0.mlp.up_proj.weight"] == "dense layer 0"
    assert report["skipped"]["model.layers.1.self_attn.o_proj.weight"].startswith("ignored")
    config = json.loads((out / "config.json").read_text())["sparsity_config"]
    assert sorted(config["targets"]) == pruned
    assert "model.layers.0.self_attn.q_proj.weight" in config["ignore"]


def test_targets_and_recipe_overrides_nm_on_mlp_only(model, saliency_run, tmp_path):
    """mask from a saved saliency with a recipe: 2:4 on the MLP, 0.3 on attention, block 1 targeted only."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("targets: ['layers\\.1\\.']\noverrides:\n  - {match: 'mlp\\.', pattern: '2:4'}\n"
                      "  - {match: 'self_attn\\.', sparsity: 0.3}\n")
    out = tmp_path / "out"
    assert main(["mask", "--model", model, "--saliency", str(saliency_run / "saliency"), "--out", str(out),
                 "--sparsity", "0.5", "--recipe", str(recipe), "--allocation", "layer"]) == 0
    before, after = read_all(model), read_all(out)
    for name, tensor in after.items():
        if ".layers.1." not in name or not name.endswith("proj.weight"):
            assert torch.equal(tensor, before[name]), name
        elif ".mlp." in name:
            assert bool(((tensor != 0).reshape(tensor.shape[0], -1, 4).sum(-1) == 2).all()), name
        else:
            assert int((tensor != 0).sum()) == keep_count(0.3, tensor.numel()), name
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["matrices"]["model.layers.1.mlp.down_proj.weight"]["nm_valid"] is True
    overrides = json.loads((out / "config.json").read_text())["sparsity_config"]["overrides"]
    assert overrides["model.layers.1.mlp.up_proj.weight"]["pattern"] == "2:4"


def test_global_allocation_over_targets_only(model, saliency_run, tmp_path):
    out = tmp_path / "out"
    assert main(["mask", "--model", model, "--saliency", str(saliency_run / "saliency"), "--out", str(out),
                 "--sparsity", "0.7", "--allocation", "global", "--targets", "mlp"]) == 0
    after, before = read_all(out), read_all(model)
    mlp = [n for n in after if ".mlp." in n]
    assert sum(int((after[n] != 0).sum()) for n in mlp) == keep_count(0.7, sum(after[n].numel() for n in mlp))
    assert all(torch.equal(after[n], before[n]) for n in after if "self_attn" in n)


@pytest.mark.parametrize("args,needle", [
    (["--targets", "nothing_matches"], "--targets: 'nothing_matches' matches no prunable matrix"),
    (["--ignore", "("], "--ignore: '(' is not a valid regular expression"),
    (["--dense-layers", "7"], "--dense-layers: block 7 does not exist"),
    (["--dense-layers", "a,b"], "--dense-layers: expected comma-separated block indices"),
    (["--ignore", "proj"], "targeting leaves no matrix to prune"),
    (["--recipe", "/nonexistent.yaml"], "--recipe: '/nonexistent.yaml' is not a file"),
])
def test_bad_targeting_is_one_line(model, tmp_path, text_file, capsys, args, needle):
    assert main(["prune", "--model", model, "--out", str(tmp_path / "o"), "--calib", text_file, *COMMON,
                 *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not os.path.exists(tmp_path / "o")


def test_dry_run_lists_plan_and_estimate_and_writes_nothing(tmp_path, text_file, capsys):
    source = make_family_checkpoint(tmp_path / "m", "phi3")
    listing = sorted(os.listdir(tmp_path))
    assert main(["prune", "--model", source, "--out", str(tmp_path / "o"), "--calib", text_file, *COMMON,
                 "--dry-run", "--pattern", "2:4", "--dense-layers", "0"]) == 0
    out = capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == listing  # not even a partial directory
    assert "model.layers.1.self_attn.qkv_proj.weight[k]" in out and "2:4 sparsity 0.5000" in out
    assert "model.layers.0.mlp.down_proj.weight" in out and "skip (dense layer 0)" in out
    assert "peak memory ~" in out and "dry run: nothing written" in out


def test_quantized_fp8_and_remote_code_checkpoints_are_refused(tmp_path, text_file, capsys):
    from safetensors.torch import load_file, save_file

    source = make_checkpoint(tmp_path / "m")
    cases = {}
    for case in ("quantized", "fp8", "remote"):
        d = tmp_path / case
        d.mkdir()
        for f in os.listdir(source):
            (d / f).write_bytes((tmp_path / "m" / f).read_bytes())
        config = json.loads((d / "config.json").read_text())
        if case == "quantized":
            config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
        elif case == "remote":
            config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
        else:
            tensors = load_file(d / "model.safetensors")
            save_file({k: v.to(torch.float8_e4m3fn) if k.endswith("proj.weight") else v for k, v in tensors.items()},
                      d / "model.safetensors", metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(config))
        cases[case] = d
    needles = {"quantized": "is a quantized checkpoint (gptq)", "fp8": "is stored as F8_E4M3",
               "remote": "not run unless you pass --trust-remote-code"}
    for case, d in cases.items():
        assert main(["prune", "--model", str(d), "--out", str(tmp_path / f"o-{case}"), "--calib", text_file,
                     *COMMON]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needles[case] in err, err


def test_report_has_versions_and_calibration_hash(saliency_run):
    report = json.loads((saliency_run / "pruning_report.json").read_text())
    assert report["versions"]["torch"] and report["versions"]["transformers"] and report["versions"]["unipruning"]
    assert len(report["calibration"]["windows_sha256"]) == 64


def test_in_memory_prune_with_targeting(model, text_file):
    from transformers import AutoModelForCausalLM

    from tests._utils import tokenizer
    from unipruning import PruneConfig, Targeting, prune
    from unipruning.data import calibration_windows

    llm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    windows = calibration_windows(tokenizer(), text_file, 2, 16, seed=0)
    result = prune(llm, windows, PruneConfig(), Targeting.from_options(targets=["mlp"], dense_layers="1"))
    assert sorted(result.masks) == sorted(n for n, _ in llm.named_parameters()
                                          if ".mlp." in n and ".layers.1." not in n)
    assert len(result.saliency.z) == 3 * 7  # the saliency still covers every prunable matrix

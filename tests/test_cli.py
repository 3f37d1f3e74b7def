"""The command line end to end on tiny checkpoints: prune, mask, eval, and what they write."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests._utils import prunable, read_all, weight_files
from unipruning.cli import main

COMMON = ["--nsamples", "8", "--seqlen", "32"]


def run_cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tiny_llama, text_file):
    out = tmp_path_factory.mktemp("runs") / "pruned-60"
    assert run_cli("prune", "--model", tiny_llama, "--out", out, "--sparsity", "0.6", "--calib", text_file,
                   *COMMON) == 0
    return str(out)


def test_prune_writes_a_loadable_checkpoint_with_exact_sparsity(pruned, tiny_llama):
    source, result = read_all(tiny_llama), read_all(pruned)
    names = set(prunable(tiny_llama))
    assert set(result) == set(source)
    kept_total = total = 0
    for key, tensor in result.items():
        assert tensor.dtype == source[key].dtype
        if key in names:
            zeros = tensor == 0
            per_row = (~zeros).sum(dim=1)  # the default, owl-row: one count for every row of a matrix
            assert bool((per_row == per_row[0]).all()), key
            kept_total, total = kept_total + int(per_row.sum()), total + tensor.numel()
            assert not torch.signbit(tensor[zeros]).any(), f"{key} has negative zeros"
            kept = ~zeros
            assert torch.equal(tensor[kept], source[key][kept])
        else:
            assert torch.equal(tensor, source[key]), f"{key} changed"
    assert abs(1 - kept_total / total - 0.6) < 0.01  # OWL's block sparsities average to 0.6 (rows round)
    model = AutoModelForCausalLM.from_pretrained(pruned)
    assert model.config.sparsity_config["sparsity"] == 0.6
    AutoTokenizer.from_pretrained(pruned)


def test_prune_copies_side_files_and_writes_saliency_and_report(pruned, tiny_llama):
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "LICENSE"):
        assert os.path.isfile(os.path.join(pruned, name)), name
    assert not any(f.endswith(".safetensors") and f.startswith("saliency") for f in os.listdir(pruned))
    saliency = os.listdir(os.path.join(pruned, "saliency"))
    assert "saliency_config.json" in saliency and "saliency.safetensors.index.json" in saliency
    with open(os.path.join(pruned, "saliency", "saliency_config.json")) as f:
        meta = json.load(f)
    assert meta["format_version"] == 2 and meta["metric"] == "stochria" and meta["steps"] == 8
    with open(os.path.join(pruned, "pruning_report.json")) as f:
        report = json.load(f)
    # owl-row's per-row counts round a block's sparsity on rows of 64 entries here: within 0.01 of the target
    assert report["total"]["sparsity"] == pytest.approx(0.6, abs=0.01)
    assert set(report["matrices"]) == set(prunable(tiny_llama))
    for key in ("versions", "peak_memory", "wall_seconds", "calibration", "settings", "git_hash"):
        assert key in report
    assert report["calibration"]["nsamples"] == 8 and len(report["calibration"]["windows_sha256"]) == 64
    assert report["total"]["dense_params"] > report["total"]["pruned_params"]
    leftovers = [f for f in os.listdir(os.path.dirname(pruned)) if ".partial-" in f or ".old-" in f]
    assert leftovers == []


def test_mask_reproduces_prune_bit_for_bit(tmp_path, pruned, tiny_llama):
    out = tmp_path / "masked-60"
    assert run_cli("mask", "--model", tiny_llama, "--saliency", f"{pruned}/saliency", "--out", out,
                   "--sparsity", "0.6") == 0
    a, b = read_all(pruned), read_all(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # prune wrote each block's shard during calibration, mask after it: the same files, byte for byte
    assert weight_files(pathlib.Path(pruned)) == weight_files(out)


@pytest.mark.parametrize("pattern,m,n", [("2:4", 4, 2), ("4:8", 8, 4)])
def test_mask_nm_patterns(tmp_path, pruned, tiny_llama, pattern, m, n):
    out = tmp_path / pattern.replace(":", "of")
    assert run_cli("mask", "--model", tiny_llama, "--saliency", f"{pruned}/saliency", "--out", out,
                   "--pattern", pattern) == 0
    tensors = read_all(out)
    for key in prunable(tiny_llama):
        groups = (tensors[key] != 0).reshape(tensors[key].shape[0], -1, m)
        assert (groups.sum(-1) <= n).all()
    with open(out / "pruning_report.json") as f:
        assert json.load(f)["total"]["nm_valid"] is True


def test_prune_and_mask_agree_for_row_and_global(tmp_path, tiny_llama, text_file):
    for allocation in ("row", "global"):
        direct = tmp_path / f"prune-{allocation}"
        assert run_cli("prune", "--model", tiny_llama, "--out", direct, "--sparsity", "0.7",
                       "--allocation", allocation, "--calib", text_file, *COMMON) == 0
        masked = tmp_path / f"mask-{allocation}"
        assert run_cli("mask", "--model", tiny_llama, "--saliency", direct / "saliency", "--out", masked,
                       "--sparsity", "0.7", "--allocation", allocation) == 0
        a, b = read_all(direct), read_all(masked)
        assert all(torch.equal(a[k], b[k]) for k in a)
        names = prunable(tiny_llama)
        kept = sum(int((a[k] != 0).sum()) for k in names)
        total = sum(a[k].numel() for k in names)
        if allocation == "global":
            assert kept == round(0.3 * total)
        else:
            assert all(int((a[k] != 0).sum(1).max()) == round(0.3 * a[k].shape[1]) for k in names)


def test_bf16_tied_checkpoint_keeps_dtype_and_ties(tmp_path, tiny_llama_bf16_tied, text_file):
    out = tmp_path / "tied"
    assert run_cli("prune", "--model", tiny_llama_bf16_tied, "--out", out, "--pattern", "2:4",
                   "--calib", text_file, *COMMON) == 0
    tensors = read_all(out)
    assert "lm_head.weight" not in tensors  # stored once, as in the source
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_overwrite_replaces_a_previous_output(tmp_path, tiny_llama, pruned):
    out = tmp_path / "again"
    args = ["mask", "--model", tiny_llama, "--saliency", f"{pruned}/saliency", "--out", out]
    assert run_cli(*args, "--sparsity", "0.5") == 0
    assert run_cli(*args, "--sparsity", "0.8", "--overwrite") == 0
    with open(out / "pruning_report.json") as f:
        assert json.load(f)["mask"]["sparsity"] == 0.8
    assert not [f for f in os.listdir(tmp_path) if ".old-" in f or ".partial-" in f]


def test_eval_prints_perplexity_with_seqlen(capsys, pruned, text_file):
    assert run_cli("eval", "--model", pruned, "--data", text_file, "--seqlen", "64", "--json") == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["seqlen"] == 64 and result["windows"] > 0 and result["perplexity"] > 1


def test_console_script_and_module_entry_points(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "unipruning", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "prune" in proc.stdout
    proc = subprocess.run(["unipruning", "prune", "--model", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_sharded_checkpoint_is_written_one_shard_per_block(tmp_path, text_file):
    from transformers import AutoModelForCausalLM as Auto

    from tests._utils import make_checkpoint

    source = tmp_path / "sharded"
    make_checkpoint(source, layers=3)
    model = Auto.from_pretrained(source)
    for name in os.listdir(source):
        if name.endswith(".safetensors"):
            os.remove(source / name)
    model.save_pretrained(source, max_shard_size="60KB")
    shards = sorted(n for n in os.listdir(source) if n.endswith(".safetensors"))
    assert len(shards) > 1 and (source / "model.safetensors.index.json").is_file()
    out = tmp_path / "out"
    assert run_cli("prune", "--model", source, "--out", out, "--pattern", "2:4", "--calib", text_file, *COMMON) == 0
    # shard 1: everything outside the blocks; shard b+2: block b (written as soon as the block is done)
    written = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    assert written == [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert all(shard == "model-00001-of-00004.safetensors" for name, shard in index.items() if ".layers." not in name)
    assert all(index[name] == f"model-{int(name.split('.')[2]) + 2:05d}-of-00004.safetensors"
               for name in index if ".layers." in name)
    source_tensors, pruned = read_all(source), read_all(out)
    assert source_tensors.keys() == pruned.keys() == index.keys()
    assert not [n for n in os.listdir(out) if n.startswith(".")]
    for key in prunable(str(source)):
        assert ((pruned[key] != 0).reshape(pruned[key].shape[0], -1, 4).sum(-1) <= 2).all()
    Auto.from_pretrained(out)

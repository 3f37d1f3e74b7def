"""Feedback `full` (docs/method.md): S measured along an AdamW trajectory of the whole model; the
original weights are restored (in memory) or kept (checkpoint outputs), and a model that does not fit
is refused with a clear error."""

import json

import torch
from transformers import AutoModelForCausalLM

import unipruning.pipeline.feedback as feedback
from tests._utils import make_checkpoint, read_all, tokenizer, weight_files
from unipruning import MaskSpec, PruneConfig, prune
from unipruning.algorithm.masks import keep_count
from unipruning.cli import main
from unipruning.data import calibration_windows

COMMON = ["--nsamples", "3", "--seqlen", "16"]


def _model_and_windows(tmp_path, text_file, nsamples):
    source = make_checkpoint(tmp_path / "m", layers=2)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    return source, model, calibration_windows(tokenizer(), text_file, nsamples, 16, seed=0)


def test_one_step_equals_feedback_none_and_later_steps_follow_the_trajectory(tmp_path, text_file):
    """S_1 is measured before any optimizer step: one step of full feedback is feedback none (its exact
    recursion), bit for bit.
    With three steps the weights move between steps, so the saliency differs; the model's weights are
    restored exactly afterwards."""
    _, model, windows = _model_and_windows(tmp_path, text_file, 3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    one_full = prune(model, windows[:1], PruneConfig(feedback="full", metric="wanda"))
    one_none = prune(model, windows[:1], PruneConfig(metric="wanda", saliency_update="exact"))
    for name, z in one_none.saliency.z.items():
        assert torch.equal(one_full.saliency.z[name], z), name
    full = prune(model, windows, PruneConfig(feedback="full", metric="wanda", mask=MaskSpec(sparsity=0.5)))
    none = prune(model, windows, PruneConfig(metric="wanda", mask=MaskSpec(sparsity=0.5)))
    assert any(not torch.equal(full.saliency.z[n], none.saliency.z[n]) for n in none.saliency.z)
    assert full.report.feedback["steps"] == 3 and full.report.feedback["loss_last"] > 0
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} not restored"
        assert p.requires_grad == flags[name] and p.grad is None, name


def test_cli_full_feedback_keeps_original_weights_outside_the_mask(tmp_path, text_file):
    source = make_checkpoint(tmp_path / "m", layers=2)
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        assert main(["prune", "--model", source, "--out", str(out), "--calib", text_file, *COMMON,
                     "--feedback", "full", "--sparsity", "0.6", "--allocation", "layer"]) == 0
        outs.append(out)
    before, after = read_all(source), read_all(outs[0])
    for name, tensor in after.items():
        if name.endswith("proj.weight"):
            kept = tensor != 0
            assert int(kept.sum()) == keep_count(0.6, tensor.numel()), name
            assert torch.equal(tensor[kept], before[name][kept]), name
        else:
            assert torch.equal(tensor, before[name]), name
    assert weight_files(outs[0]) == weight_files(outs[1])
    report = json.loads((outs[0] / "pruning_report.json").read_text())
    assert report["settings"]["feedback"] == "full" and report["feedback"]["optimizer"] == "AdamW"
    saliency = json.loads((outs[0] / "saliency" / "saliency_config.json").read_text())
    assert saliency["feedback"] == "full"


def test_full_feedback_refuses_a_model_that_does_not_fit(tmp_path, text_file, capsys, monkeypatch):
    source = make_checkpoint(tmp_path / "m")
    monkeypatch.setattr(feedback, "available_bytes", lambda device: 1000)
    assert main(["prune", "--model", source, "--out", str(tmp_path / "o"), "--calib", text_file, *COMMON,
                 "--feedback", "full"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--feedback full keeps the whole model" in err
    assert "Use --feedback none" in err

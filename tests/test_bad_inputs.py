"""Every bad input: one line on stderr naming the problem, exit code 2, no traceback, nothing written."""

import json
import os
import shutil

import pytest

from tests._utils import make_checkpoint
from unipruning.cli import main

SMALL = ["--nsamples", "4", "--seqlen", "16"]


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("other"), hidden=48, intermediate=96)


@pytest.fixture(scope="module")
def saliency_dir(tmp_path_factory, tiny_llama, text_file):
    out = tmp_path_factory.mktemp("sal") / "p"
    assert main(["prune", "--model", tiny_llama, "--out", str(out), "--calib", text_file, *SMALL]) == 0
    return str(out / "saliency")


def expect_usage_error(capsys, workdir, argv, needle):
    before = sorted(os.listdir(workdir))
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and needle in err, err
    assert sorted(os.listdir(workdir)) == before, "something was written"


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--sparsity", "0"], "--sparsity"),
        (["--sparsity", "1"], "--sparsity"),
        (["--sparsity", "1.5"], "--sparsity"),
        (["--sparsity", "-0.2"], "--sparsity"),
        (["--sparsity", "half"], "--sparsity"),
        (["--pattern", "2-4"], "--pattern"),
        (["--pattern", "4:4"], "--pattern"),
        (["--pattern", "5:4"], "--pattern"),
        (["--pattern", "0:4"], "--pattern"),
        (["--pattern", "2:4", "--sparsity", "0.6"], "contradicts"),
        (["--pattern", "2:4", "--allocation", "global"], "N:M"),
        (["--pattern", "3:5"], "not divisible by M=5"),
        (["--allocation", "global", "--bounds", "0.6", "0.2"], "bounds"),
        (["--metric", "obs"], "--metric"),
        (["--nsamples", "4000", "--seqlen", "256"], "fewer than nsamples x seqlen"),
        (["--seqlen", "257"], "max_position_embeddings 256"),
        (["--batch-size", "3"], "--batch-size"),
        (["--backend", "cuda"], "argument --backend: invalid choice: 'cuda'"),
        (["--calib", "/nonexistent/texts"], "--calib"),
    ],
)
def test_prune_rejects(capsys, tmp_path, tiny_llama, text_file, extra, needle):
    argv = ["prune", "--model", tiny_llama, "--out", tmp_path / "out", "--calib", text_file, *SMALL, *extra]
    expect_usage_error(capsys, tmp_path, argv, needle)


def test_missing_and_non_model_directories(capsys, tmp_path, text_file):
    expect_usage_error(capsys, tmp_path, ["prune", "--model", tmp_path / "absent", "--out", tmp_path / "o",
                                          "--calib", text_file], "not a directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_usage_error(capsys, tmp_path, ["prune", "--model", empty, "--out", tmp_path / "o",
                                          "--calib", text_file], "no config.json")


def test_unsupported_architecture_lists_the_supported_ones(capsys, tmp_path, text_file):
    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    expect_usage_error(capsys, tmp_path, ["prune", "--model", model, "--out", tmp_path / "o",
                                          "--calib", text_file],
                       "supported model types are gemma, gemma2, gemma3_text, llama, mistral, mixtral, opt, phi3")


def test_short_calibration_text(capsys, tmp_path, tiny_llama):
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.")
    expect_usage_error(capsys, tmp_path, ["prune", "--model", tiny_llama, "--out", tmp_path / "o",
                                          "--calib", short, *SMALL], "fewer than nsamples x seqlen")


def test_out_equal_to_inside_or_containing_the_model(capsys, tmp_path, tiny_llama, text_file):
    for out in (tiny_llama, os.path.join(tiny_llama, "sub"), os.path.dirname(tiny_llama)):
        expect_usage_error(capsys, tmp_path, ["prune", "--model", tiny_llama, "--out", out, "--calib",
                                              text_file, "--overwrite", *SMALL], "--out")


def test_non_empty_out_needs_overwrite(capsys, tmp_path, tiny_llama, text_file):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    expect_usage_error(capsys, tmp_path, ["prune", "--model", tiny_llama, "--out", out, "--calib", text_file,
                                          *SMALL], "not empty")
    assert (out / "keep.txt").read_text() == "precious"


def test_saliency_from_another_model(capsys, tmp_path, other_model, saliency_dir):
    expect_usage_error(capsys, tmp_path, ["mask", "--model", other_model, "--saliency", saliency_dir,
                                          "--out", tmp_path / "o"], "different model")


def test_saliency_of_another_format_version(capsys, tmp_path, tiny_llama, saliency_dir):
    copy = tmp_path / "sal"
    shutil.copytree(saliency_dir, copy)
    meta = json.loads((copy / "saliency_config.json").read_text())
    meta["format_version"] = 99
    (copy / "saliency_config.json").write_text(json.dumps(meta))
    expect_usage_error(capsys, tmp_path, ["mask", "--model", tiny_llama, "--saliency", copy,
                                          "--out", tmp_path / "o"], "format version 99")


def test_not_a_saliency_directory(capsys, tmp_path, tiny_llama):
    (tmp_path / "empty").mkdir()
    expect_usage_error(capsys, tmp_path, ["mask", "--model", tiny_llama, "--saliency", tmp_path / "empty",
                                          "--out", tmp_path / "o"], "not a unipruning saliency")


def test_mask_out_must_not_contain_the_saliency(capsys, tmp_path, tiny_llama, saliency_dir):
    expect_usage_error(capsys, tmp_path, ["mask", "--model", tiny_llama, "--saliency", saliency_dir,
                                          "--out", os.path.dirname(saliency_dir), "--overwrite"], "--saliency")


def test_mask_rejects_bad_pattern_before_writing(capsys, tmp_path, tiny_llama, saliency_dir):
    expect_usage_error(capsys, tmp_path, ["mask", "--model", tiny_llama, "--saliency", saliency_dir,
                                          "--out", tmp_path / "o", "--pattern", "3:5"], "not divisible")


def test_eval_rejects_bad_data_and_seqlen(capsys, tmp_path, tiny_llama):
    expect_usage_error(capsys, tmp_path, ["eval", "--model", tiny_llama, "--data", tmp_path / "x.csv",
                                          "--seqlen", "64"], "--data")
    short = tmp_path / "s.txt"
    short.write_text("tiny")
    expect_usage_error(capsys, tmp_path, ["eval", "--model", tiny_llama, "--data", short, "--seqlen", "200"],
                       "fewer than one window")


def test_unknown_command_and_missing_argument(capsys, tmp_path):
    expect_usage_error(capsys, tmp_path, ["shrink"], "invalid choice")
    expect_usage_error(capsys, tmp_path, ["prune", "--out", tmp_path / "o"], "--model")

"""Data-parallel calibration: `torchrun --nproc_per_node=2 -m unipruning prune` with gloo on the CPU
writes the same checkpoint and saliency as one process with the same --batch-size."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests._utils import read_all
from unipruning.cli import main

ARGS = ["--nsamples", "4", "--seqlen", "32", "--batch-size", "2", "--sparsity", "0.6"]


def saliency_tensors(directory):
    return read_all(os.path.join(directory, "saliency"))


@pytest.mark.slow  # budget: about 25 s on 2 CPU cores (two processes start torch and transformers)
def test_two_gloo_processes_equal_one_process(tiny_llama, text_file, tmp_path):
    single, parallel = tmp_path / "single", tmp_path / "parallel"
    assert main(["prune", "--model", tiny_llama, "--out", str(single), "--calib", text_file, *ARGS]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "unipruning",
         "prune", "--model", tiny_llama, "--out", str(parallel), "--calib", text_file, "--device", "cpu", *ARGS],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # rank 0 alone writes and reports
    with open(parallel / "pruning_report.json") as f:
        assert json.load(f)["processes"] == 2
    a, b = read_all(single), read_all(parallel)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    za, zb = saliency_tensors(single), saliency_tensors(parallel)
    assert za.keys() == zb.keys() and all(torch.equal(za[k], zb[k]) for k in za)
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_batch_size_must_split_over_the_processes(monkeypatch, tiny_llama, text_file, tmp_path, capsys):
    from unipruning.pipeline import distributed

    monkeypatch.setattr(distributed, "world", lambda: (0, 3))
    monkeypatch.setattr(distributed, "init_from_env", lambda device: device)
    assert main(["prune", "--model", tiny_llama, "--out", str(tmp_path / "o"), "--calib", text_file, *ARGS]) == 2
    assert "multiple of the process count" in capsys.readouterr().err

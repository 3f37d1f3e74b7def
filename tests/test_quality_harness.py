"""benchmarks/quality.py end to end on a tiny checkpoint (the README command's code path, minus the
training): every kind of run (a calibration, masks from its saliency, global allocation, reconstruction,
SparseGPT, feedback full), and the JSON, markdown and PNG it writes. The harness runs each `unipruning`
command in its own process; here they run in this one (the CLI itself is tested in test_cli.py), which
saves the 7-9 s that each process spends importing torch and transformers."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # budget: 60 s on 2 CPU cores (11 runs in this process)
def test_quality_harness_writes_its_table_and_plot(tiny_llama, text_file, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("quality", os.path.join(ROOT, "benchmarks", "quality.py"))
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)

    def in_process(args):
        from unipruning.cli import main

        assert main(args) == 0, args

    monkeypatch.setattr(quality, "_run", in_process)
    methods = ["ria", "sparsegpt", "unipruning stochria layer", "unipruning stochria global",
               "unipruning stochria layer + obs", "unipruning stochria full layer"]
    quality.main(["--model", tiny_llama, "--calib", text_file, "--data", text_file, "--nsamples", "4",
                  "--seqlen", "32", "--device", "cpu", "--out", str(tmp_path), "--work", str(tmp_path),
                  "--methods", *methods, "--settings", "0.5", "2:4"])
    with open(tmp_path / "quality.json") as f:
        result = json.load(f)
    got = {(r["method"], r["setting"]): r for r in result["rows"]}
    expected = {(m, s) for m in methods for s in ("0.5", "2:4")} - {("unipruning stochria global", "2:4")}
    assert set(got) == expected
    assert got[("ria", "2:4")]["made_by"] == "mask from ria"
    assert got[("unipruning stochria full layer", "2:4")]["made_by"] == "mask from unipruning stochria full layer"
    assert got[("unipruning stochria layer + obs", "0.5")]["reconstruction_seconds"] > 0
    assert all(abs(r["sparsity"] - 0.5) < 1e-6 and r["perplexity"] > 1 for r in result["rows"])
    table = (tmp_path / "quality.md").read_text()
    assert "| sparsegpt |" in table and "| unipruning stochria full layer |" in table and "not run" not in table
    assert (tmp_path / "quality.png").stat().st_size > 10_000
    assert [p for p in os.listdir(tmp_path) if p.startswith("unipruning-quality-")] == []  # scratch removed

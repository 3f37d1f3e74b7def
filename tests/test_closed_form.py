"""The closed-form saliency (algorithm/closed_form.py) against the exact recursion it replaces: the same
thresholds bit for bit, z to float rounding, and the same masks at every sparsity and allocation."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from unipruning.kernels import reference as R

from tests._utils import make_family_checkpoint, tokenizer
from unipruning import MaskSpec, PruneConfig, UsageError, prune
from unipruning.algorithm import closed_form
from unipruning.data import calibration_windows

MASKS = [MaskSpec(sparsity=0.01), MaskSpec(sparsity=0.1), MaskSpec(sparsity=0.5), MaskSpec(sparsity=0.7),
         MaskSpec(pattern="2:4"), MaskSpec(sparsity=0.5, allocation="row"),
         MaskSpec(sparsity=0.7, allocation="global")]


def _exact_recursion(weight, vectors, kappa, m):
    """The step-by-step recursion of the torch twin (kernels/reference.py mirror_step_)."""
    z, t = torch.zeros(weight.shape, dtype=torch.float32), 0.0
    for k in range(vectors[2].shape[0]):
        row_inv = None if vectors[0] is None else vectors[0][k]
        col_inv = None if vectors[1] is None else vectors[1][k]
        t, _ = R.mirror_step_(z, weight, row_inv, col_inv, vectors[2][k], kappa, t, m)
    return z, t


@pytest.mark.parametrize("metric", ["stochria", "ria", "wanda", "magnitude"])
def test_closed_form_of_one_matrix_equals_the_recursion(metric):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 80, generator=gen)
    steps = 24
    sqsums = [torch.rand(80, generator=gen, dtype=torch.float64) * 5 for _ in range(steps)]
    vectors = closed_form.step_vectors(weight, sqsums, [64] * steps, metric, list(range(100, 100 + steps)))
    for k in range(steps):  # each step's vectors are that step's own
        one = R.step_vectors(weight, sqsums[k], 64, metric, 100 + k)
        for batched, single in zip(vectors, one, strict=True):
            if single is not None:
                torch.testing.assert_close(batched[k], single, rtol=1e-6, atol=0)
    m = 4
    z_exact, t_exact = _exact_recursion(weight, vectors, 0.01, m)
    z, t = closed_form.saliency(weight, vectors, 0.01, m)
    assert float(t) == t_exact  # the candidates carry the exact thresholds
    torch.testing.assert_close(z, z_exact, rtol=2e-6, atol=0)
    bottom = z_exact.reshape(-1).argsort()[:4 * m]  # the entries near the threshold run the exact recursion
    assert torch.equal(z.reshape(-1)[bottom], z_exact.reshape(-1)[bottom])


@pytest.fixture(scope="module")
def tiny(tiny_llama, text_file):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    return model, calibration_windows(tokenizer(), text_file, 12, 32, seed=0)


@pytest.mark.parametrize("metric", ["stochria", "ria", "wanda"])
def test_prune_in_closed_form_cuts_the_masks_of_the_exact_recursion(tiny, metric):
    model, windows = tiny
    exact = prune(model, windows, PruneConfig(metric=metric, saliency_update="exact"))
    fast = prune(model, windows, PruneConfig(metric=metric))  # auto: closed form for feedback none
    assert fast.saliency.metadata["saliency_update"] == "closed-form"
    assert exact.saliency.metadata["saliency_update"] == "exact"
    assert fast.saliency.t == exact.saliency.t
    for spec in MASKS:
        a, b = exact.saliency.masks(model, spec), fast.saliency.masks(model, spec)
        agree = sum(int((a[n] == b[n]).sum()) for n in a) / sum(a[n].numel() for n in a)
        assert agree >= 0.999, (spec, agree)


def test_experts_never_routed_to_are_unseen_in_both(tmp_path, text_file):
    source = make_family_checkpoint(tmp_path / "mixtral", "mixtral", seed=6)
    model = AutoModelForCausalLM.from_pretrained(source)
    windows = calibration_windows(tokenizer(), text_file, 4, 16, seed=0)
    exact = prune(model, windows, PruneConfig(saliency_update="exact"))
    fast = prune(model, windows, PruneConfig(saliency_update="closed-form"))
    assert fast.saliency.metadata["unseen"] == exact.saliency.metadata["unseen"]
    assert fast.saliency.t == exact.saliency.t
    masks_exact, masks_fast = exact.saliency.masks(model, MaskSpec(sparsity=0.6)), fast.saliency.masks(
        model, MaskSpec(sparsity=0.6))
    assert all(torch.equal(masks_exact[n], masks_fast[n]) for n in masks_exact)


def test_closed_form_needs_frozen_weights():
    with pytest.raises(UsageError, match="`saliency_update` closed-form needs frozen weights"):
        PruneConfig(feedback="full", saliency_update="closed-form")
    assert not PruneConfig(feedback="full").closed_form and PruneConfig().closed_form

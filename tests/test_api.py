"""The in-memory API: prune(model, windows, config), Saliency save/load/masks, apply_masks."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests._utils import prunable, tokenizer
from unipruning import MaskSpec, PruneConfig, Saliency, UsageError, apply_masks, compute_masks, prune
from unipruning.data import calibration_windows


@pytest.fixture(scope="module")
def model(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def windows(text_file):
    return calibration_windows(tokenizer(), text_file, nsamples=8, seqlen=32, seed=0)


@pytest.fixture(scope="module")
def result(model, windows):
    # one budget per matrix (the default, owl-row, is tested in test_defaults.py)
    return prune(model, windows, PruneConfig(mask=MaskSpec(sparsity=0.6, allocation="layer")))


def test_prune_leaves_the_model_untouched(tiny_llama, model, result):
    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_prune_result_has_exact_layer_sparsity(model, result):
    names = prunable(model.config)
    assert list(result.masks) == names == list(result.saliency.z)
    for name, keep in result.masks.items():
        assert keep.dtype == torch.bool
        assert int(keep.sum()) == round(0.4 * keep.numel()), name
    assert result.report.total.sparsity == pytest.approx(0.6, abs=1e-3)
    assert len(result.report.calibration["windows_sha256"]) == 64


def test_threshold_is_the_lam_quantile_of_z(result):
    for name, z in result.saliency.z.items():
        m = max(1, int(0.001 * z.numel()))
        assert result.saliency.t[name] == float(z.flatten().kthvalue(m).values), name
        assert (z >= 0).all()


def test_same_seed_same_masks_other_seed_other_saliency(model, windows, result):
    again = prune(model, windows, PruneConfig(mask=MaskSpec(sparsity=0.6, allocation="layer")))
    for name in result.masks:
        assert torch.equal(result.masks[name], again.masks[name])
        assert torch.equal(result.saliency.z[name], again.saliency.z[name])
    other = prune(model, windows, PruneConfig(mask=MaskSpec(sparsity=0.6), seed=1))
    assert any(not torch.equal(result.saliency.z[n], other.saliency.z[n]) for n in result.masks)


def test_masks_for_other_sparsities_and_patterns_without_recalibration(model, result):
    for spec in (MaskSpec(sparsity=0.8), MaskSpec(pattern="2:4"), MaskSpec(pattern="4:8"),
                 MaskSpec(sparsity=0.5, allocation="row"), MaskSpec(sparsity=0.7, allocation="global")):
        masks = result.saliency.masks(model, spec)
        total = sum(k.numel() for k in masks.values())
        kept = sum(int(k.sum()) for k in masks.values())
        if spec.allocation == "global":
            assert kept == round((1 - spec.sparsity) * total)
        elif spec.allocation == "layer" and not spec.nm:
            assert all(int(k.sum()) == round((1 - spec.sparsity) * k.numel()) for k in masks.values())
        if spec.nm:
            n, m = spec.nm
            for keep in masks.values():
                assert (keep.reshape(keep.shape[0], -1, m).sum(-1) == n).all()
        if spec.allocation == "row":
            for keep in masks.values():
                assert (keep.sum(1) == round(0.5 * keep.shape[1])).all()


def test_global_allocation_exact_total_within_bounds(model, result):
    spec = MaskSpec(sparsity=0.7, allocation="global", bounds=(0.5, 0.8))
    masks = result.saliency.masks(model, spec)
    total = sum(k.numel() for k in masks.values())
    assert sum(int(k.sum()) for k in masks.values()) == round(0.3 * total)
    for keep in masks.values():
        sparsity = 1 - int(keep.sum()) / keep.numel()
        assert 0.5 - 1e-9 <= sparsity <= 0.8 + 1e-3


def test_global_infeasible_bounds_is_a_usage_error(model, result):
    with pytest.raises(UsageError, match="infeasible"):
        result.saliency.masks(model, MaskSpec(sparsity=0.9, allocation="global", bounds=(0.0, 0.5)))


def test_saliency_round_trip(tmp_path, model, result):
    result.saliency.save(tmp_path / "sal")
    loaded = Saliency.load(tmp_path / "sal", expect_fingerprint=result.saliency.metadata["fingerprint"])
    assert list(loaded.z) == list(result.saliency.z)
    for name in loaded.z:
        assert torch.equal(loaded.z[name], result.saliency.z[name])
        assert loaded.t[name] == result.saliency.t[name]
    spec = MaskSpec(sparsity=0.6, allocation="layer")
    for name, keep in compute_masks(loaded, dict(model.named_parameters()), spec).items():
        assert torch.equal(keep, result.masks[name])
    with pytest.raises(UsageError, match="different model"):
        Saliency.load(tmp_path / "sal", expect_fingerprint="0" * 64)


def test_apply_masks_writes_positive_zeros(tiny_llama, result):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    params = dict(model.named_parameters())
    name = next(iter(result.masks))
    with torch.no_grad():
        params[name].copy_(-params[name].abs())  # every dropped entry would become -0.0 without the + 0.0
    before = params[name].detach().clone()
    apply_masks(model, result.masks)
    keep = result.masks[name]
    after = params[name].detach()
    assert torch.equal(after[keep], before[keep])
    assert (after[~keep] == 0).all() and not torch.signbit(after[~keep]).any()


def test_batch_size_groups_windows_into_steps(model, windows):
    result = prune(model, windows, PruneConfig(batch_size=2))
    assert result.saliency.metadata["steps"] == 4
    with pytest.raises(UsageError, match="`batch_size` 3 must divide `nsamples` 8"):
        prune(model, windows, PruneConfig(batch_size=3))


@pytest.mark.parametrize("metric", ["magnitude", "wanda", "ria"])
def test_every_metric_runs(model, windows, metric):
    result = prune(model, windows[:2], PruneConfig(metric=metric, mask=MaskSpec(pattern="2:4")))
    assert result.report.total.nm_valid is True


def test_magnitude_saliency_ranks_like_magnitude(model, windows):
    """With S = |W| / mean every step, z is monotone in |W|: the masks are plain magnitude masks."""
    result = prune(model, windows[:4], PruneConfig(metric="magnitude", mask=MaskSpec(sparsity=0.5,
                                                                                     allocation="layer")))
    params = dict(model.named_parameters())
    for name, keep in result.masks.items():
        w = params[name].detach().abs()
        assert w[keep].min() >= w[~keep].max(), name

"""The defaults are the product: what `allocation` auto means, presets that belong to the library (reachable from
Python as from the CLI), and the one-call API `prune(model, windows, sparsity=..., preset=...)`."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests._utils import tokenizer
from unipruning import MaskConfig, MaskSpec, PruneConfig, Targeting, UsageError, prune
from unipruning.config import DEFAULT_ALLOCATION, PRESETS
from unipruning.data import calibration_windows


@pytest.mark.parametrize("options,allocation", [
    ({}, DEFAULT_ALLOCATION),                       # unstructured: the best mask-only budget measured
    ({"sparsity": 0.7}, DEFAULT_ALLOCATION),
    ({"pattern": "2:4"}, "layer"),                  # N:M: per group of M, the only budget there is
    ({"sparsity": 0.95}, "row"),                    # OWL's +-0.08 would leave (0, 1): per row instead
    ({"allocation": "layer"}, "layer"),             # named: kept
])
def test_auto_allocation(options, allocation):
    spec = MaskSpec(**options)
    assert spec.allocation == allocation
    assert spec.auto == ("allocation" not in options)


def test_auto_gives_way_where_the_sweep_chooses_per_matrix():
    assert PruneConfig(reconstruct="obs", guide_alpha=1.0).mask.allocation == "owl"
    assert MaskConfig(reconstruct="obs", guide_alpha=1.0).mask.allocation == "owl"
    assert PruneConfig(metric="sparsegpt", reconstruct="obs").mask.allocation == "layer"
    assert PruneConfig(reconstruct="obs").mask.allocation == DEFAULT_ALLOCATION  # the saliency's own masks
    with pytest.raises(UsageError, match="per row"):  # named, not auto: the guided sweep cannot honour it
        PruneConfig(mask=MaskSpec(allocation="row"), reconstruct="obs", guide_alpha=1.0)


def test_recipe_overrides_turn_auto_into_row(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("overrides:\n  - {match: 'mlp\\.', sparsity: 0.3}\n")
    targeting = Targeting.from_options(recipe=str(recipe))
    assert targeting.settle(MaskSpec()).allocation == "row"  # per-matrix sparsities need per-matrix/row budgets
    assert targeting.settle(MaskSpec(allocation="layer")).allocation == "layer"
    assert Targeting().settle(MaskSpec()).allocation == DEFAULT_ALLOCATION


def test_presets_belong_to_the_library():
    quality = PruneConfig.preset("quality")
    assert (quality.reconstruct, quality.guide_alpha, quality.mask.allocation) == ("obs", 1.0, "owl")
    assert PruneConfig.preset("fast").mask.allocation == PRESETS["fast"]["allocation"]
    assert PruneConfig.preset("quality", pattern="2:4").mask.allocation == "layer"  # N:M: per group
    assert PruneConfig.preset("fast", sparsity=0.7, seed=3).mask.sparsity == 0.7
    with pytest.raises(UsageError, match="`allocation` row contradicts `preset` quality"):
        PruneConfig.preset("quality", allocation="row")
    with pytest.raises(UsageError, match="`preset`: expected one of"):
        PruneConfig.preset("best")
    with pytest.raises(UsageError, match="`spars`: not an option"):
        PruneConfig.from_options(spars=0.5)


@pytest.fixture(scope="module")
def model(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def windows(text_file):
    return calibration_windows(tokenizer(), text_file, nsamples=8, seqlen=32, seed=0)


def test_one_call_with_keyword_options_equals_the_config_object(model, windows):
    by_keywords = prune(model, windows, sparsity=0.5, pattern="2:4", preset="fast")
    by_config = prune(model, windows, PruneConfig(mask=MaskSpec(pattern="2:4")))
    assert list(by_keywords.masks) == list(by_config.masks)
    for name, keep in by_keywords.masks.items():
        assert torch.equal(keep, by_config.masks[name]), name
    assert by_keywords.report.total.sparsity == pytest.approx(0.5)
    with pytest.raises(UsageError, match="either `config` or keyword options"):
        prune(model, windows, PruneConfig(), sparsity=0.5)
    with pytest.raises(UsageError, match="runs on checkpoints"):
        prune(model, windows, preset="quality")

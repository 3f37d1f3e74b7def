"""UniPruningModifier inside llm-compressor's oneshot (the `llmcompressor` extra, 0.14): the masks of `unipruning
prune` on the same windows when it has the calibration pass to itself, alone or before a quantization stage;
what a shared pass changes; llm-compressor's names; one line when llm-compressor is absent. llm-compressor pins
transformers <= 5.17, so the test extras (the newest transformers) leave it out and these tests skip there, except
the last; CI runs them in a virtual environment of their own (.ci/llmcompressor), where a skip fails the step."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests._utils import tokenizer
from unipruning import prune
from unipruning.data import calibration_windows
from unipruning.models import model_matrices, weight_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_llmc = pytest.mark.skipif(importlib.util.find_spec("llmcompressor") is None,
                                reason="needs llm-compressor 0.14: pip install -e '.[llmcompressor]'")


@pytest.fixture(scope="module")
def windows(text_file):
    return calibration_windows(tokenizer(), text_file, nsamples=8, seqlen=32, seed=0)


def _oneshot(checkpoint: str, windows: torch.Tensor, recipe: list, **kwargs):
    from llmcompressor import oneshot

    from unipruning.integrations.llmcompressor import calibration_loader

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    oneshot(model=model, dataset=calibration_loader(windows), recipe=recipe, **kwargs)
    return model


def _differing(model, masks: dict) -> dict[str, int]:
    """{matrix: entries whose kept/pruned state differs from `masks`} (a kept weight is non-zero here)."""
    return {m.name: int(((weight_of(model, m) != 0) != masks[m.name]).sum()) for m in model_matrices(model)}


def _reference(checkpoint: str, windows: torch.Tensor, **options) -> dict:
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    masks = prune(model, windows, **options).masks
    kept = sum(int(k.sum()) for k in masks.values()) / sum(k.numel() for k in masks.values())
    assert kept == pytest.approx(0.5, abs=0.01)  # the comparison below compares real masks
    return masks


@needs_llmc
@pytest.mark.parametrize("ours, theirs", [({"sparsity": 0.5}, {"sparsity": 0.5}),  # owl-row: across blocks
                                          ({"mask_structure": "2:4"}, {"pattern": "2:4"}),
                                          ({"sparsity": 0.5, "saliency_update": "exact", "metric": "wanda"},
                                           {"sparsity": 0.5, "saliency_update": "exact", "metric": "wanda"}),
                                          ({"sparsity": 0.5, "metric": "magnitude", "allocation": "global"},
                                           {"sparsity": 0.5, "metric": "magnitude", "allocation": "global"})],
                         ids=["owl-row", "2:4", "exact-wanda", "magnitude-global"])
def test_alone_its_masks_are_unipruning_prunes(tiny_llama, windows, ours, theirs):
    from unipruning.integrations.llmcompressor import UniPruningModifier

    modifier = UniPruningModifier(ignore=["lm_head"], **ours)
    model = _oneshot(tiny_llama, windows, [modifier])
    assert _differing(model, _reference(tiny_llama, windows, **theirs)) == dict.fromkeys(modifier.masked, 0)
    assert len(modifier.masked) == len(model_matrices(model))


@needs_llmc
def test_before_a_quantization_stage_on_cpu(tiny_llama, windows):
    """oneshot's default pipeline (independent) gives each modifier its pass: the pruning is the alone run's,
    then FP8 quantization calibrates the pruned model; its rounding keeps the zeros."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    from unipruning.integrations.llmcompressor import UniPruningModifier

    recipe = [UniPruningModifier(mask_structure="2:4", ignore=["lm_head"]),
              QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"])]
    model = _oneshot(tiny_llama, windows, recipe)
    assert set(_differing(model, _reference(tiny_llama, windows, pattern="2:4")).values()) == {0}
    for m in model_matrices(model):
        module = model.get_submodule(m.module)
        assert module.quantization_scheme.weights.type == "float", m.module
        assert module.weight_scale.numel() == module.weight.shape[0], m.module  # one scale per channel
    assert not hasattr(model.lm_head, "weight_scale")


@needs_llmc
def test_a_shared_pass_prunes_each_layer_before_the_next_calibrates(tiny_llama, windows):
    """pipeline 'sequential': one pass for both modifiers, masks cut at each layer's end. The first block sees
    the same inputs as in `unipruning prune`; the second, the pruned first block's outputs (its masks differ),
    unless oneshot(propagate_error=False) keeps propagating the dense outputs."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    from unipruning.integrations.llmcompressor import UniPruningModifier

    def recipe():
        return [UniPruningModifier(sparsity=0.5, allocation="row", ignore=["lm_head"]),
                QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"])]

    masks = _reference(tiny_llama, windows, sparsity=0.5, allocation="row")
    differing = _differing(_oneshot(tiny_llama, windows, recipe(), pipeline="sequential"), masks)
    assert {n: d for n, d in differing.items() if ".layers.0." in n} == {n: 0 for n in differing if ".layers.0." in n}
    assert sum(d for n, d in differing.items() if ".layers.1." in n) > 0
    dense = _oneshot(tiny_llama, windows, recipe(), pipeline="sequential", propagate_error=False)
    assert set(_differing(dense, masks).values()) == {0}


@needs_llmc
def test_a_shared_pass_refuses_an_allocation_across_blocks(tiny_llama, windows):
    from llmcompressor.modifiers.quantization import QuantizationModifier

    from unipruning.integrations.llmcompressor import UniPruningModifier

    recipe = [UniPruningModifier(sparsity=0.5), QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC")]
    with pytest.raises(Exception, match="allocation` owl-row needs every block's saliency before any mask"):
        _oneshot(tiny_llama, windows, recipe, pipeline="sequential")


@needs_llmc
def test_targets_and_ignore_as_llm_compressor_matches_them(tiny_llama, windows):
    from unipruning.integrations.llmcompressor import UniPruningModifier

    modifier = UniPruningModifier(sparsity=0.5, allocation="layer", targets=["re:.*self_attn$"],
                                  ignore=["re:.*k_proj$"])
    model = _oneshot(tiny_llama, windows, [modifier])
    pruned = sorted(modifier.masked)
    assert pruned and all(".self_attn." in n and "k_proj" not in n for n in pruned)
    for m in model_matrices(model):
        zeros = int((weight_of(model, m) == 0).sum())
        assert (zeros == m.shape[0] * m.shape[1] // 2) if m.name in pruned else zeros == 0, m.name
    with pytest.raises(Exception, match="leave no prunable matrix"):
        _oneshot(tiny_llama, windows, [UniPruningModifier(sparsity=0.5, ignore=["Linear"])])


@needs_llmc
@pytest.mark.parametrize("fields, message", [
    ({"mask_structure": "3:4"}, "only N:2N"),
    ({"mask_structure": "2-4"}, "mask_structure must be N:M"),
    ({"preset": "quality"}, "runs the OBS reconstruction pass"),
    ({"metric": "sparsegpt"}, "use llm-compressor's SparseGPTModifier"),
    ({"sparsity_profile": "flat"}, "expected owl"),
    ({"sparsity": 0.5, "owl_lambda": 0.1}, "Extra inputs are not permitted"),  # llm-compressor's name: owl_lmbda
])
def test_bad_fields_say_which_and_why(fields, message):
    from unipruning.integrations.llmcompressor import UniPruningModifier

    with pytest.raises(ValueError, match=message):
        UniPruningModifier(**{"sparsity": 0.5, **fields})


@needs_llmc
def test_llm_compressor_names_map_to_the_prune_config():
    from unipruning.integrations.llmcompressor import UniPruningModifier

    config = UniPruningModifier(sparsity=0.7, sparsity_profile="owl", owl_m=7, owl_lmbda=0.1, metric="wanda",
                                sequential_update=True).prune_config()
    assert (config.metric, config.mask.sparsity, config.mask.allocation) == ("wanda", 0.7, "owl-row")
    assert (config.mask.owl_m, config.mask.owl_lambda) == (7, 0.1)
    assert UniPruningModifier(sparsity=0.5, mask_structure="4:8").prune_config().mask.pattern == "4:8"


def test_without_llm_compressor_the_import_fails_in_one_line():
    """Absent (as in CI), or hidden here: the error is one line that says what to install."""
    code = ("import sys\nsys.modules['llmcompressor'] = None  # absent, as far as imports go\n"
            "import unipruning.integrations.llmcompressor")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: ") and last.endswith("pip install 'unipruning[llmcompressor]'"), last
    assert "During handling" not in done.stderr  # one error, not llm-compressor's chained before it

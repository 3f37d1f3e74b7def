"""llm-compressor recipes (llmc.py): what maps to unipruning's settings and targeting, and one line for what
does not. The recipes are written as llm-compressor's documentation and modifiers' docstrings show them."""

import json

import pytest
import yaml

from unipruning import UsageError, llmc
from unipruning.cli import _method_settings, build_parser, main
from unipruning.config import MaskSpec
from unipruning.io.checkpoint import load_config
from unipruning.models import model_matrices
from unipruning.targeting import Targeting

SPARSEGPT_24 = r"""
sparsity_stage:
  sparsity_modifiers:
    SparseGPTModifier:
      sparsity: 0.5
      mask_structure: "2:4"
      dampening_frac: 0.02
      block_size: 64
      sequential_update: true
      targets: ['re:model.layers.\d+$']
      ignore: ['re:.*lm_head', 're:model.layers.0.self_attn.*', 'model.layers.1.mlp.down_proj']
"""
WANDA = """
test_stage:
  obcq_modifiers:
    WandaPruningModifier:
      sparsity: 0.6
"""


def recipe(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_sparsegpt_recipe_maps_to_its_settings(tmp_path):
    path = recipe(tmp_path, SPARSEGPT_24)
    with open(path) as f:
        imported = llmc.import_recipe(yaml.safe_load(f), path)
    assert imported.modifier == "SparseGPTModifier"
    assert imported.settings == {"metric": "sparsegpt", "reconstruct": "obs", "sparsity": None, "pattern": "2:4",
                                 "allocation": "layer", "percdamp": 0.02, "blocksize": 64}
    assert imported.targets == ("re:model.layers.\\d+$",) and len(imported.ignore) == 3


def test_wanda_recipe_is_one_step_per_row(tmp_path):
    args = build_parser().parse_args(["prune", "--model", "m", "--out", "o", "--recipe", recipe(tmp_path, WANDA),
                                      "--nsamples", "16"])
    _method_settings(args)
    assert (args.metric, args.allocation, args.batch_size, args.sparsity) == ("wanda", "row", 16, 0.6)


def test_owl_profile_is_the_owl_allocation_cut_per_row_as_wandas(tmp_path):
    text = WANDA.replace("sparsity: 0.6", "sparsity: 0.6\n      sparsity_profile: owl\n      owl_m: 7\n"
                         "      owl_lmbda: 0.05")
    args = build_parser().parse_args(["prune", "--model", "m", "--out", "o", "--recipe", recipe(tmp_path, text),
                                      "--nsamples", "16"])
    _method_settings(args)
    assert (args.allocation, args.owl_m, args.owl_lambda, args.metric) == ("owl-row", 7.0, 0.05, "wanda")


def test_targets_and_ignore_match_module_names_as_compressed_tensors_does(tmp_path, tiny_llama):
    targeting = Targeting.from_options(recipe=recipe(tmp_path, SPARSEGPT_24))
    config = load_config(tiny_llama)
    plan, skipped = targeting.plan(model_matrices(config), 2, MaskSpec(pattern="2:4"))
    assert skipped == {**{f"model.layers.0.self_attn.{p}_proj.weight": "ignored (re:model.layers.0.self_attn.*)"
                          for p in "qkvo"},
                       "model.layers.1.mlp.down_proj.weight": "ignored (model.layers.1.mlp.down_proj)"}
    assert len(plan) == 14 - 5
    # re: is re.match on the module name (anchored at the start): a pattern for the middle matches nothing
    nowhere = recipe(tmp_path, WANDA.replace("sparsity: 0.6", "sparsity: 0.6\n      targets: ['re:mlp']"), "n.yaml")
    with pytest.raises(UsageError, match="targets 're:mlp' matches no module"):
        Targeting.from_options(recipe=nowhere).plan(model_matrices(config), 2, MaskSpec())


@pytest.mark.parametrize("change,needle", [
    ("WandaPruningModifier:\n      sparsity: 0.6", "GPTQModifier:\n      scheme: W4A16"),
    ("sparsity: 0.6", "sparsity: [0.5, 0.6]"),
    ("sparsity: 0.6", "sparsity: 0.6\n      mask_structure: '1:4'"),
    ("sparsity: 0.6", "sparsity: 0.6\n      sparsity_profile: owl\n      owl_m: 5"),
    ("sparsity: 0.6", "sparsity: 0.6\n      start: 0"),
    ("sparsity: 0.6", "sparsity: 0.6\n      targets: ['LlamaMLP']"),
    ("sparsity: 0.6", "sparsity: 0.6\n      ignore: ['Linear']"),
])
def test_what_does_not_map_is_one_line_naming_it(tmp_path, tiny_llama, text_file, capsys, change, needle):
    path = recipe(tmp_path, WANDA.replace(change, needle))
    assert main(["prune", "--model", tiny_llama, "--out", str(tmp_path / "o"), "--recipe", path, "--calib",
                 text_file, "--nsamples", "4", "--seqlen", "16", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and path in err, err
    expected = {"GPTQ": "GPTQModifier does not map", "[0.5": "must be one number", "1:4": "prunes 1 of every 4",
                "owl": "needs numbers owl_m and owl_lmbda", "start": "start does not map",
                "LlamaMLP": "class 'LlamaMLP'",
                "'Linear'": "ignores every prunable matrix"}
    assert next(v for k, v in expected.items() if k in needle) in err, err
    assert not (tmp_path / "o").exists()


def test_sparsegpt_recipe_through_the_command_line(tmp_path, tiny_llama, text_file, capsys):
    out = tmp_path / "o"
    assert main(["prune", "--model", tiny_llama, "--out", str(out), "--recipe", recipe(tmp_path, SPARSEGPT_24),
                 "--calib", text_file, "--nsamples", "4", "--seqlen", "16", "--quiet"]) == 0
    with open(out / "pruning_report.json") as f:
        report = json.load(f)
    assert report["settings"]["metric"] == "sparsegpt" and report["settings"]["reconstruct"] == "obs"
    assert report["settings"]["percdamp"] == 0.02 and report["settings"]["blocksize"] == 64
    assert report["reconstruction"]["damp"] == 0.02 and report["reconstruction"]["blocksize"] == 64
    assert report["targeting"]["llm_compressor"]["ignore"][2] == "model.layers.1.mlp.down_proj"
    assert "model.layers.1.mlp.down_proj.weight" in report["skipped"]
    assert main(["mask", "--model", tiny_llama, "--saliency", str(out), "--out", str(tmp_path / "m"), "--recipe",
                 recipe(tmp_path, SPARSEGPT_24)]) == 2
    assert "use it with `unipruning prune`" in capsys.readouterr().err

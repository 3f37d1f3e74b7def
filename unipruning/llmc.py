"""llm-compressor recipes as unipruning settings: `prune --recipe recipe.yaml` with a SparseGPTModifier or a
WandaPruningModifier stage.

The format (vllm-project/llm-compressor: recipe/recipe.py `Recipe.from_dict`, modifiers/pruning/sparsegpt/
sgpt_base.py `SparsityModifierBase`) is a mapping of stages (keys ending in `_stage`), each a mapping of
modifier groups (keys ending in `_modifiers`), each a mapping {modifier class: its arguments}:

    sparsity_stage:
      sparsity_modifiers:
        SparseGPTModifier:
          sparsity: 0.5
          mask_structure: "2:4"
          targets: ["re:model.layers.\\d+$"]
          ignore: ["re:.*lm_head"]

What maps (anything else is refused in one line, naming the key):
- SparseGPTModifier: `metric` sparsegpt with `reconstruct` obs; its `block_size` and `dampening_frac` are
  `blocksize` and `percdamp`. WandaPruningModifier: `metric` wanda cut per output row (llm-compressor's
  wanda_sparsify sorts each row), from one step over all calibration windows (the score over every
  token, as Wanda's).
- `sparsity` (one number) and `mask_structure` "N:M": llm-compressor PRUNES N of every M (its
  topk(..., prune_n, largest=False) marks the pruned entries), unipruning's `pattern` KEEPS N of every M, so
  only N:M with M = 2N (2:4, 4:8, ...) means the same in both and is accepted; with N:M both ignore
  `sparsity`. "0:0" is unstructured.
- `targets` and `ignore` as compressed-tensors matches them: "re:REGEX" is re.match on the module name,
  anything else the exact module name or a class name; `targets` name modules that contain the pruned
  linears (default Linear: all). Class names map only where they are unambiguous: Linear and *DecoderLayer.
- `sparsity_profile: owl` with `owl_m` and `owl_lmbda`: the OWL allocation (`owl_m`, `owl_lambda`), both
  numbers required as llm-compressor requires them; `allocation` owl-row for Wanda (its cut stays per output
  row inside each layer's OWL sparsity), owl otherwise.
Ignored, as they do not change what is computed here: `sequential_update` (deprecated there),
`sequential_targets` (the decoder blocks are always the sequential unit), `offload_hessians`, `group`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from .errors import UsageError
from .patterns import MATCH, Matches, compile_pattern

log = logging.getLogger("unipruning")

METHODS = {  # llm-compressor modifier -> unipruning settings ("nsamples": one step over every window)
    "SparseGPTModifier": {"metric": "sparsegpt", "reconstruct": "obs"},
    "WandaPruningModifier": {"metric": "wanda", "allocation": "row", "batch_size": "nsamples"},
}
_COMMON = {"sparsity", "mask_structure", "targets", "ignore", "sparsity_profile", "owl_m", "owl_lmbda"}
_ACCEPTED = {"SparseGPTModifier": _COMMON | {"block_size", "dampening_frac", "preserve_sparsity_mask"},
             "WandaPruningModifier": _COMMON}
_IGNORED = {"sequential_update", "sequential_targets", "offload_hessians", "group"}
_ALL_LINEAR = ("Linear", "__ALL__")


@dataclass(frozen=True)
class ImportedRecipe:
    """What a recipe says: `settings` for PruneConfig/MaskSpec (keys: metric, reconstruct, allocation,
    batch_size, sparsity, pattern, percdamp, blocksize) and llm-compressor `targets`/`ignore` strings."""

    modifier: str
    settings: dict
    targets: tuple[str, ...]
    ignore: tuple[str, ...]


def is_llmc_recipe(data) -> bool:
    """Whether a parsed recipe file is in llm-compressor's format (stages), not unipruning's."""
    return isinstance(data, dict) and any(isinstance(k, str) and k.endswith("_stage") for k in data)


def _modifiers(data: dict, path: str) -> list[tuple[str, dict]]:
    found = []
    for stage, groups in data.items():
        if not (isinstance(stage, str) and stage.endswith("_stage")):
            if stage != "args":
                raise UsageError(f"`recipe` {path}: top-level key {stage!r} is not a stage (*_stage)")
            continue
        if not isinstance(groups or {}, dict):
            raise UsageError(f"`recipe` {path}: {stage} is not a mapping of modifier groups (*_modifiers)")
        for group, modifiers in (groups or {}).items():
            if not (isinstance(group, str) and group.endswith("_modifiers") and isinstance(modifiers, dict)):
                raise UsageError(f"`recipe` {path}: {stage}.{group} is not a mapping of modifiers (*_modifiers)")
            for name, args in modifiers.items():
                if not isinstance(args or {}, dict):
                    raise UsageError(f"`recipe` {path}: {stage}.{group}.{name} is not a mapping of its arguments")
                found.append((name, args or {}))
    return found


def import_recipe(data: dict, path: str) -> ImportedRecipe:
    """The settings of an llm-compressor recipe (parsed YAML/JSON) with one pruning modifier."""
    modifiers = _modifiers(data, path)
    other = [name for name, _ in modifiers if name not in METHODS]
    if other:
        raise UsageError(f"`recipe` {path}: {other[0]} does not map to unipruning (only SparseGPTModifier and "
                         "WandaPruningModifier do; unipruning prunes, it does not quantize)")
    if len(modifiers) != 1:
        raise UsageError(f"`recipe` {path}: expected one pruning modifier, found {len(modifiers)}")
    name, args = modifiers[0]
    unknown = sorted(set(args) - _ACCEPTED[name] - _IGNORED)
    if unknown:
        raise UsageError(f"`recipe` {path}: {name}.{unknown[0]} does not map to a unipruning setting")
    settings = dict(METHODS[name])
    settings.update(_mask_settings(name, args, path))
    if name == "SparseGPTModifier":
        settings.update(_obs_settings(args, path))
    targets, ignore = _strings(args.get("targets", ["Linear"]), "targets", path), _strings(args.get("ignore", []),
                                                                                            "ignore", path)
    return ImportedRecipe(name, settings, targets, ignore)


def _mask_settings(name: str, args: dict, path: str) -> dict:
    sparsity = args.get("sparsity")
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool):
        raise UsageError(f"`recipe` {path}: {name}.sparsity must be one number (per-layer lists do not map; use "
                         f"overrides in a unipruning recipe), got {sparsity!r}")
    structure = str(args.get("mask_structure", "0:0")).strip()
    match = re.fullmatch(r"(\d+)\s*:\s*(\d+)", structure)
    if match is None:
        raise UsageError(f"`recipe` {path}: {name}.mask_structure must be N:M, got {structure!r}")
    n, m = int(match.group(1)), int(match.group(2))
    settings: dict = {"sparsity": float(sparsity), "pattern": "unstructured"}
    if (n, m) != (0, 0):
        if m != 2 * n:
            raise UsageError(f"`recipe` {path}: mask_structure {n}:{m} prunes {n} of every {m} in llm-compressor, "
                             f"where unipruning's pattern {n}:{m} keeps {n}; only N:2N (2:4, 4:8) means the same")
        if abs(float(sparsity) - 0.5) > 1e-9:
            log.info("recipe %s: llm-compressor ignores sparsity %s with mask_structure %s; so does unipruning",
                     path, sparsity, structure)
        settings.update(sparsity=None, pattern=f"{n}:{m}", allocation="layer")
    profile = args.get("sparsity_profile")
    if profile is not None:
        settings.update(_owl(name, args, path))
    return settings


def _owl(name: str, args: dict, path: str) -> dict:
    if str(args["sparsity_profile"]).lower() != "owl":
        raise UsageError(f"`recipe` {path}: {name}.sparsity_profile {args['sparsity_profile']!r} does not map "
                         "(llm-compressor knows only owl)")
    m, lmbda = args.get("owl_m"), args.get("owl_lmbda")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (m, lmbda)):
        raise UsageError(f"`recipe` {path}: {name}.sparsity_profile owl needs numbers owl_m and owl_lmbda (as "
                         f"llm-compressor does), got {m!r} and {lmbda!r}")
    per_row = METHODS[name].get("allocation") == "row"
    return {"allocation": "owl-row" if per_row else "owl", "owl_m": float(m), "owl_lambda": float(lmbda)}


def _obs_settings(args: dict, path: str) -> dict:
    if args.get("preserve_sparsity_mask"):
        raise UsageError(f"`recipe` {path}: SparseGPTModifier.preserve_sparsity_mask does not map (unipruning "
                         "prunes a dense model)")
    damp = args.get("dampening_frac", 0.01)
    if damp is None:
        raise UsageError(f"`recipe` {path}: SparseGPTModifier.dampening_frac null does not map (give a fraction)")
    return {"percdamp": damp, "blocksize": args.get("block_size", 128)}


def _strings(value, key: str, path: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise UsageError(f"`recipe` {path}: {key} must be a string or a list of strings, got {value!r}")
    for item in items:
        if item.startswith("re:"):
            compile_pattern(f"`recipe` {path}: {key} {item!r}", item[3:])
    return tuple(items)


# ------------------------------------------------------------------------ matching (compressed-tensors')
def _is_class_name(target: str) -> bool:
    return not target.startswith("re:") and "." not in target and target[:1].isupper()


def check_targets(targets: tuple[str, ...], ignore: tuple[str, ...], path: str) -> None:
    """Refuse class names whose meaning here would be a guess (only Linear and *DecoderLayer map)."""
    for target in targets:
        if _is_class_name(target) and target not in _ALL_LINEAR and not target.endswith("DecoderLayer"):
            raise UsageError(f"`recipe` {path}: targets class {target!r} does not map (use Linear, a decoder "
                             "layer class, module names or re: patterns)")
    if any(i in _ALL_LINEAR for i in ignore):
        raise UsageError(f"`recipe` {path}: ignore {', '.join(i for i in ignore if i in _ALL_LINEAR)} ignores "
                         "every prunable matrix")


def ancestors(module: str) -> list[str]:
    """A module's name and every name above it (model.layers.0.mlp.up_proj: model, model.layers, ...)."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _matches(target: str, module: str, found: Matches) -> bool:
    if target.startswith("re:"):
        regex = compile_pattern("`recipe`", target[3:])
        return found(MATCH, regex.pattern, regex.flags, module)
    return target == module


def targeted(targets: tuple[str, ...], module: str, found: Matches) -> bool:
    """Whether a prunable linear `module` lies in (or is) a module that `targets` name (`found`: their
    "re:" patterns matched against the module names, patterns.py)."""
    if any(t in _ALL_LINEAR or (_is_class_name(t) and t.endswith("DecoderLayer")) for t in targets):
        return True
    return any(_matches(t, a, found) for t in targets for a in ancestors(module))


def ignored(ignore: tuple[str, ...], module: str, found: Matches) -> str | None:
    """The first `ignore` entry matching the linear `module`, or None."""
    return next((i for i in ignore if _matches(i, module, found)), None)

"""Which prunable matrices a mask prunes, and with which sparsity and pattern.

`--targets REGEX ...` (default: every prunable matrix), `--ignore REGEX ...`, `--dense-layers 0,-1`
and a recipe file (`--recipe FILE`, YAML or JSON) with per-module overrides. Regular expressions are
searched (re.search) in the matrices' logical names (models.Matrix.name), e.g. `mlp\\.` or
`layers\\.0\\.`. The saliency is always learned for every prunable matrix, so `mask` can re-target
without calibrating again; targeting only decides what is cut and written.

A recipe:

    ignore: ["self_attn\\.o_proj"]          # added to --ignore
    targets: ["layers\\.(1|2)\\."]          # added to --targets
    dense_layers: [0, -1]                  # added to --dense-layers
    overrides:                             # first match wins; unmatched matrices take the CLI mask
      - {match: "mlp\\.", pattern: "2:4"}
      - {match: "self_attn\\.", sparsity: 0.4}

An llm-compressor recipe (stages with a SparseGPTModifier or WandaPruningModifier, llmc.py) is read too:
its `targets` and `ignore` are matched against module names the way compressed-tensors matches them
(`module_targets`, `module_ignore`); the rest of it (method, sparsity, pattern) is the CLI's to apply.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from . import llmc
from .config import MaskSpec
from .errors import UsageError

_RECIPE_KEYS = {"ignore", "targets", "dense_layers", "overrides"}
_OVERRIDE_KEYS = {"match", "sparsity", "pattern"}


def _compile(option: str, patterns) -> tuple[re.Pattern, ...]:
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except (re.error, TypeError) as exc:
            raise UsageError(f"{option}: {p!r} is not a valid regular expression ({exc})") from None
    return tuple(compiled)


def parse_layers(text: str | list | tuple | None) -> tuple[int, ...]:
    """'0,-1' -> (0, -1): block indices, negative from the end."""
    if text is None or text == "":
        return ()
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        return tuple(int(str(i).strip()) for i in items)
    except ValueError:
        raise UsageError(f"`dense_layers`: expected comma-separated block indices such as 0,-1, got {text!r}") from None


@dataclass(frozen=True)
class Override:
    match: re.Pattern
    sparsity: float | None = None
    pattern: str | None = None


@dataclass(frozen=True)
class Targeting:
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    dense_layers: tuple[int, ...] = ()
    overrides: tuple[Override, ...] = field(default=())
    recipe: str | None = None
    module_targets: tuple[str, ...] = ()  # llm-compressor's targets and ignore (llmc.py), on module names
    module_ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _compile("`targets`", self.targets)
        _compile("`ignore`", self.ignore)

    @classmethod
    def from_options(cls, targets=None, ignore=None, dense_layers=None, recipe: str | None = None) -> Targeting:
        targets, ignore = list(targets or ()), list(ignore or ())
        layers = list(parse_layers(dense_layers))
        overrides: list[Override] = []
        data = read_recipe(recipe) if recipe else None
        if llmc.is_llmc_recipe(data):
            imported = llmc.import_recipe(data, recipe)
            llmc.check_targets(imported.targets, imported.ignore, recipe)
            return cls(tuple(targets), tuple(ignore), tuple(layers), (), recipe, imported.targets, imported.ignore)
        if data is not None:
            targets += list(data.get("targets", []))
            ignore += list(data.get("ignore", []))
            layers += list(parse_layers(data.get("dense_layers")))
            for i, item in enumerate(data.get("overrides", [])):
                if not isinstance(item, dict) or "match" not in item or set(item) - _OVERRIDE_KEYS:
                    raise UsageError(f"`recipe` {recipe}: overrides[{i}] must be a mapping with 'match' and "
                                     "'sparsity' and/or 'pattern'")
                (match,) = _compile(f"`recipe` {recipe}: overrides[{i}].match", [item["match"]])
                overrides.append(Override(match, item.get("sparsity"), item.get("pattern")))
        return cls(tuple(targets), tuple(ignore), tuple(layers), tuple(overrides), recipe)

    def plan(self, matrices, num_blocks: int, spec: MaskSpec) -> tuple[dict[str, MaskSpec], dict[str, str]]:
        """({pruned matrix: its MaskSpec}, {skipped matrix: why}) for `matrices` (models.Matrix)."""
        targets, ignore = _compile("`targets`", self.targets), _compile("`ignore`", self.ignore)
        dense = set()
        for layer in self.dense_layers:
            if not -num_blocks <= layer < num_blocks:
                raise UsageError(f"`dense_layers`: block {layer} does not exist (the model has {num_blocks} blocks)")
            dense.add(layer % num_blocks)
        for regex in targets:
            if not any(regex.search(m.name) for m in matrices):
                raise UsageError(f"`targets`: {regex.pattern!r} matches no prunable matrix")
        for target in self.module_targets:
            if not any(llmc.targeted((target,), m.module) for m in matrices):
                raise UsageError(f"`recipe` {self.recipe}: targets {target!r} matches no module holding a prunable "
                                 "matrix")
        if self.overrides and spec.cross_block:
            raise UsageError("`recipe` overrides set per-matrix sparsities: use `allocation` layer or row")
        pruned, skipped = {}, {}
        for m in matrices:
            hit = next((r.pattern for r in ignore if r.search(m.name)), None) or llmc.ignored(self.module_ignore,
                                                                                             m.module)
            if m.block in dense:
                skipped[m.name] = f"dense layer {m.block}"
            elif hit is not None:
                skipped[m.name] = f"ignored ({hit})"
            elif not self._targeted(m, targets):
                skipped[m.name] = "not targeted"
            else:
                pruned[m.name] = self._spec_for(m.name, spec)
        if not pruned:
            raise UsageError("targeting leaves no matrix to prune (check `targets`, `ignore`, `dense_layers`)")
        return pruned, skipped

    def _targeted(self, m, targets: tuple[re.Pattern, ...]) -> bool:
        """No targets at all: every matrix; else one of --targets' regexes or the recipe's module targets."""
        if not targets and not self.module_targets:
            return True
        return any(r.search(m.name) for r in targets) or llmc.targeted(self.module_targets, m.module)

    def _spec_for(self, name: str, spec: MaskSpec) -> MaskSpec:
        for o in self.overrides:
            if o.match.search(name):
                pattern = o.pattern or (spec.pattern if o.sparsity is None else "unstructured")
                nm = pattern != "unstructured"
                return MaskSpec(sparsity=None if nm else (o.sparsity if o.sparsity is not None else spec.sparsity),
                                pattern=pattern, allocation="layer" if nm else spec.allocation, bounds=spec.bounds,
                                owl_m=spec.owl_m, owl_lambda=spec.owl_lambda)
        return spec

    def to_dict(self) -> dict:
        return {"targets": list(self.targets), "ignore": list(self.ignore), "dense_layers": list(self.dense_layers),
                "overrides": [{"match": o.match.pattern, "sparsity": o.sparsity, "pattern": o.pattern}
                              for o in self.overrides], "recipe": self.recipe,
                **({"llm_compressor": {"targets": list(self.module_targets), "ignore": list(self.module_ignore)}}
                   if self.module_targets or self.module_ignore else {})}


def read_recipe(path: str) -> dict:
    """A recipe file (YAML, or JSON, which YAML also reads) as a dict with only the known keys, or an
    llm-compressor recipe as it is (llmc.py reads it)."""
    if not os.path.isfile(path):
        raise UsageError(f"`recipe`: {path!r} is not a file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
        raise UsageError(f"`recipe` {path}: cannot parse it: {str(exc).splitlines()[0]}") from None
    if llmc.is_llmc_recipe(data):
        return data
    if not isinstance(data, dict) or set(data) - _RECIPE_KEYS:
        raise UsageError(f"`recipe` {path}: expected a mapping with keys among {', '.join(sorted(_RECIPE_KEYS))}")
    return data

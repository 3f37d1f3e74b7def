"""Which prunable matrices a mask prunes, and with which sparsity and pattern.

`--targets REGEX ...` (default: every prunable matrix), `--ignore REGEX ...`, `--dense-layers 0,-1`
and a recipe file (`--recipe FILE`, YAML or JSON) with per-module overrides. Regular expressions are
searched (re.search) in the matrices' logical names (models.Matrix.name), e.g. `mlp\\.` or
`layers\\.0\\.`, all at once in a child process under a time bound (patterns.py); each must match a
matrix. The saliency is always learned for every prunable matrix, so `mask` can re-target
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
from .files import read_regular
from .patterns import MATCH, SEARCH, Matches, compile_pattern

_RECIPE_KEYS = {"ignore", "targets", "dense_layers", "overrides"}
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred bytes
MAX_RECIPE_NODES = 100_000  # values of a recipe once its YAML aliases are expanded
_OVERRIDE_KEYS = {"match", "sparsity", "pattern"}


def _compile(option: str, patterns) -> tuple[re.Pattern, ...]:
    return tuple(compile_pattern(option, p) for p in patterns)


def _strings(option: str, value) -> tuple[str, ...]:
    """A list of regular expressions, as given (a single string would be taken letter by letter)."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{option}: expected a list of regular expressions (strings), got {value!r:.200}")
    return tuple(value)


def parse_layers(text: str | list | tuple | int | None) -> tuple[int, ...]:
    """'0,-1' -> (0, -1): block indices, negative from the end."""
    if text is None or text == "":
        return ()
    items = text.split(",") if isinstance(text, str) else [text] if isinstance(text, int) else text
    try:
        if not isinstance(items, (list, tuple)) or any(isinstance(i, bool) for i in items):
            raise TypeError(text)
        return tuple(int(str(i).strip()) for i in items)
    except (TypeError, ValueError):
        raise UsageError(f"`dense_layers`: expected comma-separated block indices such as 0,-1, got "
                         f"{text!r:.200}") from None


@dataclass(frozen=True)
class Override:
    match: re.Pattern
    sparsity: float | None = None
    pattern: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.match, re.Pattern):
            object.__setattr__(self, "match", compile_pattern("`overrides` match", self.match))


def _search(pattern: re.Pattern) -> tuple[str, str, int]:
    return SEARCH, pattern.pattern, pattern.flags


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
        for name in ("targets", "ignore", "module_targets", "module_ignore"):
            object.__setattr__(self, name, _strings(f"`{name}`", getattr(self, name)))
        _compile("`targets`", self.targets)
        _compile("`ignore`", self.ignore)
        object.__setattr__(self, "dense_layers", parse_layers(self.dense_layers))
        if not isinstance(self.overrides, (list, tuple)) or not all(isinstance(o, Override) for o in self.overrides):
            raise UsageError(f"`overrides`: expected a list of Override, got {self.overrides!r:.200}")
        object.__setattr__(self, "overrides", tuple(self.overrides))
        if self.recipe is not None and not isinstance(self.recipe, (str, os.PathLike)):
            raise UsageError(f"`recipe`: expected a path, got {self.recipe!r:.200}")
        object.__setattr__(self, "recipe", None if self.recipe is None else os.fspath(self.recipe))

    @classmethod
    def from_options(cls, targets=None, ignore=None, dense_layers=None, recipe: str | None = None) -> Targeting:
        targets, ignore = list(_strings("`targets`", targets or ())), list(_strings("`ignore`", ignore or ()))
        layers = list(parse_layers(dense_layers))
        overrides: list[Override] = []
        data = read_recipe(recipe) if recipe else None
        if llmc.is_llmc_recipe(data):
            imported = llmc.import_recipe(data, recipe)
            llmc.check_targets(imported.targets, imported.ignore, recipe)
            return cls(tuple(targets), tuple(ignore), tuple(layers), (), recipe, imported.targets, imported.ignore)
        if data is not None:
            targets += _strings(f"`recipe` {recipe}: targets", data.get("targets", []))
            ignore += _strings(f"`recipe` {recipe}: ignore", data.get("ignore", []))
            layers += list(parse_layers(data.get("dense_layers")))
            overrides = _overrides(data.get("overrides", []), recipe)
        return cls(tuple(targets), tuple(ignore), tuple(layers), tuple(overrides), recipe)

    def settle(self, spec: MaskSpec) -> MaskSpec:
        """`spec` as this targeting cuts it: a recipe's per-matrix overrides need per-matrix or per-row
        budgets, so `allocation` auto (owl-row) becomes row."""
        return spec.with_allocation("row") if self.overrides and spec.cross_block and spec.auto else spec

    def plan(self, matrices, num_blocks: int, spec: MaskSpec) -> tuple[dict[str, MaskSpec], dict[str, str]]:
        """({pruned matrix: its MaskSpec}, {skipped matrix: why}) for `matrices` (models.Matrix)."""
        targets, ignore = _compile("`targets`", self.targets), _compile("`ignore`", self.ignore)
        dense = self._dense(num_blocks)
        found = self._matches(matrices)
        self._check_hits(matrices, found)
        if self.overrides and spec.cross_block:
            raise UsageError("`recipe` overrides set per-matrix sparsities: use `allocation` layer or row")
        pruned, skipped = {}, {}
        for m in matrices:
            hit = next((r.pattern for r in ignore if found(*_search(r), m.name)), None) or llmc.ignored(
                self.module_ignore, m.module, found)
            if m.block in dense:
                skipped[m.name] = f"dense layer {m.block}"
            elif hit is not None:
                skipped[m.name] = f"ignored ({hit})"
            elif not self._targeted(m, targets, found):
                skipped[m.name] = "not targeted"
            else:
                pruned[m.name] = self._spec_for(m.name, spec, found)
        if not pruned:
            raise UsageError("targeting leaves no matrix to prune (check `targets`, `ignore`, `dense_layers`)")
        return pruned, skipped

    def _dense(self, num_blocks: int) -> set[int]:
        dense = set()
        for layer in self.dense_layers:
            if not -num_blocks <= layer < num_blocks:
                raise UsageError(f"`dense_layers`: block {layer} does not exist (the model has {num_blocks} blocks)")
            dense.add(layer % num_blocks)
        return dense

    def _matches(self, matrices) -> Matches:
        """Every pattern of this targeting against the matrix names (and llm-compressor's against the
        module names and their ancestors), at once, under patterns.py's time and memory bound."""
        patterns = {_search(r): "`targets`" for r in _compile("`targets`", self.targets)}
        patterns.update({_search(r): "`ignore`" for r in _compile("`ignore`", self.ignore)})
        patterns.update({_search(o.match): f"`recipe` {self.recipe}: overrides" for o in self.overrides})
        for target in (*self.module_targets, *self.module_ignore):
            if target.startswith("re:"):
                regex = compile_pattern(f"`recipe` {self.recipe}", target[3:])
                patterns[(MATCH, regex.pattern, regex.flags)] = f"`recipe` {self.recipe}"
        modules = [a for m in matrices for a in llmc.ancestors(m.module)]
        return Matches(patterns, [m.name for m in matrices] + modules)

    def _check_hits(self, matrices, found: Matches) -> None:
        """A regular expression that matches no prunable matrix is a mistake (a typo, another model's
        names), --ignore's and the overrides' as --targets'; llm-compressor's ignore is exempt (its recipes
        name lm_head, which is never prunable here)."""
        overrides = (f"`recipe` {self.recipe}: overrides match", tuple(o.match for o in self.overrides))
        for option, patterns in (("`targets`", _compile("`targets`", self.targets)),
                                 ("`ignore`", _compile("`ignore`", self.ignore)), overrides):
            for regex in patterns:
                if not any(found(*_search(regex), m.name) for m in matrices):
                    raise UsageError(f"{option}: {regex.pattern!r} matches no prunable matrix")
        for target in self.module_targets:
            if not any(llmc.targeted((target,), m.module, found) for m in matrices):
                raise UsageError(f"`recipe` {self.recipe}: targets {target!r} matches no module holding a prunable "
                                 "matrix")

    def _targeted(self, m, targets: tuple[re.Pattern, ...], found: Matches) -> bool:
        """No targets at all: every matrix; else one of --targets' regexes or the recipe's module targets."""
        if not targets and not self.module_targets:
            return True
        return any(found(*_search(r), m.name) for r in targets) or llmc.targeted(self.module_targets, m.module, found)

    def _spec_for(self, name: str, spec: MaskSpec, found: Matches) -> MaskSpec:
        for o in self.overrides:
            if found(*_search(o.match), name):
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


def _overrides(items, recipe: str) -> list[Override]:
    if not isinstance(items, list):
        raise UsageError(f"`recipe` {recipe}: overrides must be a list of mappings, got {items!r:.200}")
    overrides = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "match" not in item or set(item) - _OVERRIDE_KEYS:
            raise UsageError(f"`recipe` {recipe}: overrides[{i}] must be a mapping with 'match' and "
                             "'sparsity' and/or 'pattern'")
        (match,) = _compile(f"`recipe` {recipe}: overrides[{i}].match", [item["match"]])
        overrides.append(Override(match, item.get("sparsity"), item.get("pattern")))
    return overrides


def _children(node) -> list:
    import yaml

    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _node_count(root, limit: int) -> int:
    """Nodes of a composed YAML document once every alias is expanded (what the loaded data will hold),
    counted without expanding: each node's count once, from its children's; min(count, limit + 1), and
    limit + 1 for a document that contains itself."""
    counts: dict[int, int] = {}
    path: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            counts[id(node)] = min(limit + 1, 1 + sum(counts[id(c)] for c in _children(node)))
            path.discard(id(node))
        elif id(node) in path:
            return limit + 1
        elif id(node) not in counts:
            path.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in _children(node) if id(c) not in counts)
    return counts[id(root)]


def _load_yaml(text: str, path: str):
    """yaml.safe_load, refusing a document whose aliases expand beyond MAX_RECIPE_NODES (an anchor bomb:
    nine levels of nine aliases are 387 million nodes from a few hundred bytes)."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _node_count(node, MAX_RECIPE_NODES) > MAX_RECIPE_NODES:
            raise UsageError(f"`recipe` {path}: its aliases expand to more than {MAX_RECIPE_NODES} values (an anchor "
                             "bomb, or a document that contains itself): write the values out")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_recipe(path: str) -> dict:
    """A recipe file (YAML, or JSON, which YAML also reads) as a dict with only the known keys, or an
    llm-compressor recipe as it is (llmc.py reads it). At most MAX_RECIPE_BYTES, and its YAML aliases
    expanded at most MAX_RECIPE_NODES values."""
    if not os.path.isfile(path):
        raise UsageError(f"`recipe`: {path!r} is not a file")
    raw = read_regular(path, "recipe", MAX_RECIPE_BYTES)
    try:
        text = raw.decode("utf-8")
        data = json.loads(text) if path.endswith(".json") else _load_yaml(text, path)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
        raise UsageError(f"`recipe` {path}: cannot parse it: {(str(exc).splitlines() or [type(exc).__name__])[0]}"
                         ) from None
    if llmc.is_llmc_recipe(data):
        return data
    if not isinstance(data, dict) or set(data) - _RECIPE_KEYS:
        raise UsageError(f"`recipe` {path}: expected a mapping with keys among {', '.join(sorted(_RECIPE_KEYS))}")
    return data

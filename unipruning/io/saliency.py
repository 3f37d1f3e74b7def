"""The saliency (z and t of every prunable matrix) and its files: the versioned `saliency/` directory of
an output, and the per-block state a run in progress keeps so that it can resume.

A saliency directory holds one safetensors shard per decoder block (float32 `{name}.z` and a one-element
`{name}.t` per matrix), an index, and `saliency_config.json` (format version, the source model's
fingerprint, metric, kappa, lam, steps, feedback, seed, the calibration windows' shape, matrix names).
Loading keeps z on disk until a mask asks for it (a LazyMapping): masks are cut one matrix at a time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..algorithm.masks import compute_masks
from ..errors import UsageError
from ..files import read_regular
from ..lazy import LazyMapping
from ..models import model_matrices, weight_of
from .staging import atomic_file

log = logging.getLogger("unipruning")

FORMAT_VERSION = 2  # 2: stochria subsets as keyed cyclic windows; the closed-form update (metadata)
SALIENCY_CONFIG = "saliency_config.json"
SALIENCY_INDEX = "saliency.safetensors.index.json"
MAX_JSON_BYTES = 64 << 20  # its config and index: kB to a few MB

_BLOCK_OF = re.compile(r"^(.*?\.\d+)\.")


def _shard_groups(names: list[str]) -> list[list[str]]:
    """Consecutive names of one decoder block form one shard (memory: one block's z at a time)."""
    groups: list[list[str]] = []
    last = None
    for name in names:
        match = _BLOCK_OF.match(name)
        block = match.group(1) if match else name
        if not groups or block != last:
            groups.append([])
        groups[-1].append(name)
        last = block
    return groups


def _zt_tensors(names, z: Mapping[str, torch.Tensor], t: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """The stored form of a saliency: float32 `{name}.z` and a one-element `{name}.t` per matrix."""
    tensors = {}
    for name in names:
        tensors[f"{name}.z"] = z[name].detach().to("cpu", torch.float32).contiguous()
        tensors[f"{name}.t"] = torch.tensor([t[name]], dtype=torch.float32)
    return tensors


def _thresholds(path: str) -> dict[str, float]:
    """The `{name}.t` values of one stored file (one open; z is left on disk)."""
    with safe_open(path, framework="pt") as handle:
        return {key[:-2]: float(handle.get_tensor(key)[0]) for key in handle.keys() if key.endswith(".t")}


def _shard_facts(path: str) -> tuple[dict[str, float], dict[str, tuple[int, ...]]]:
    """({name: t}, {name: shape of z}) of one saliency shard, or a one-line error naming it."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))  # the OS's own reason (permission denied...)
        with safe_open(path, framework="pt") as handle:
            keys = list(handle.keys())
            t = {key[:-2]: float(handle.get_tensor(key)[0]) for key in keys if key.endswith(".t")}
            shapes = {key[:-2]: tuple(handle.get_slice(key).get_shape()) for key in keys if key.endswith(".z")}
    except OSError as exc:
        raise UsageError(f"`saliency_dir`: cannot read {path}: {exc.strerror or exc}") from None
    except (SafetensorError, IndexError, RuntimeError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"`saliency_dir`: {path} is not a readable saliency shard ({detail}): it is truncated or "
                         "corrupt; copy it again or recompute it with prune") from None
    return t, shapes


def _read_json(path: str, what: str):
    try:
        return json.loads(read_regular(path, "saliency_dir", MAX_JSON_BYTES))
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"`saliency_dir`: {path} is not valid JSON ({exc}): copy it again or recompute the "
                         f"saliency with prune ({what})") from None


def stored_tensors(entries: Mapping[str, tuple[str, str]]) -> LazyMapping:
    """{name: tensor} read on access from {name: (safetensors file, key)}, in the entries' order."""

    def load(name: str) -> torch.Tensor:
        path, key = entries[name]
        with safe_open(path, framework="pt") as handle:
            return handle.get_tensor(key)

    return LazyMapping(entries, load)


@dataclass
class Saliency:
    """z and t of every prunable matrix, plus how they were obtained (metadata)."""

    z: Mapping[str, torch.Tensor]  # a dict, or a LazyMapping backed by files
    t: dict[str, float]
    metadata: dict = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # of z, when loaded from a directory

    def save(self, directory: str) -> None:
        """Write a versioned saliency directory: one safetensors shard per decoder block (float32 z and
        t per matrix), an index and the metadata. Holds one block's z in memory at a time."""
        os.makedirs(directory, exist_ok=True)
        groups = _shard_groups(list(self.z))
        weight_map = {}
        for i, names in enumerate(groups, 1):
            shard = _zt_tensors(names, self.z, self.t)
            filename = f"saliency-{i:05d}-of-{len(groups):05d}.safetensors"
            save_file(shard, os.path.join(directory, filename), metadata={"format": "pt"})
            weight_map.update({key: filename for key in shard})
            del shard
        with open(os.path.join(directory, SALIENCY_INDEX), "w") as f:
            json.dump({"metadata": {"format_version": FORMAT_VERSION}, "weight_map": weight_map}, f, indent=1)
        with open(os.path.join(directory, SALIENCY_CONFIG), "w") as f:
            json.dump({"format_version": FORMAT_VERSION, **self.metadata}, f, indent=1, sort_keys=True)

    @classmethod
    def load(cls, directory: str, expect_fingerprint: str | None = None, expect_source: str | None = None
             ) -> Saliency:
        """Read a saliency directory; refuses another format version, a damaged directory, or (if given)
        another model's architecture (`expect_fingerprint`) or weights (`expect_source`, their sha256)."""
        metadata = _load_metadata(directory)
        if expect_fingerprint is not None and metadata.get("fingerprint") != expect_fingerprint:
            raise UsageError("`saliency_dir`: it was computed for a different model (fingerprint mismatch)")
        found = metadata.get("source_sha256")
        if expect_source is not None and found is None:
            raise UsageError("`saliency_dir`: it records no sha256 of the weights it was computed on (source sha256 "
                             "not recorded: an older unipruning wrote it), so it cannot be checked against this "
                             "model: recompute it with prune")
        if expect_source is not None and found != expect_source:
            raise UsageError("`saliency_dir`: it was computed on other weights of this architecture (source sha256 "
                             f"{str(found)[:12]}, this model's {expect_source[:12]}): pass the model it was computed "
                             "on, or recompute it with prune")
        entries, t, shapes = _load_entries(directory)
        order = metadata.get("names", sorted(entries))
        missing = [n for n in order if n not in entries or n not in t] if isinstance(order, list) else ["names"]
        if missing:
            raise UsageError(f"`saliency_dir`: {directory} lacks the saliency of {missing[0]!r} that "
                             f"{SALIENCY_CONFIG} lists: copy it again or recompute it with prune")
        return cls(z=stored_tensors({n: entries[n] for n in order}), t={n: t[n] for n in order}, metadata=metadata,
                   shapes={n: shapes[n] for n in order})

    def masks(self, weights: Mapping[str, torch.Tensor] | nn.Module, spec) -> dict[str, torch.Tensor]:
        """Keep masks for a MaskSpec; `weights` (a model or {name: W}) supplies the |W| tie-break."""
        if isinstance(weights, nn.Module):
            views = {m.name: weight_of(weights, m) for m in model_matrices(weights)}
            weights = {name: views[name].detach() for name in self.z}
        return compute_masks(self.z, weights, spec)


def _load_metadata(directory: str) -> dict:
    if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
        raise UsageError(f"`saliency_dir`: expected a directory path, got {directory!r}")
    meta_path = os.path.join(directory, SALIENCY_CONFIG)
    if not (os.path.isfile(meta_path) and os.path.isfile(os.path.join(directory, SALIENCY_INDEX))):
        raise UsageError(f"`saliency_dir`: {directory!r} is not a unipruning saliency directory")
    metadata = _read_json(meta_path, "its settings")
    if not isinstance(metadata, dict):
        raise UsageError(f"`saliency_dir`: {meta_path} is not a JSON object: recompute the saliency with prune")
    version = metadata.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise UsageError(f"`saliency_dir`: format version {version} is not supported (this unipruning reads "
                         f"{FORMAT_VERSION})")
    return metadata


def _load_entries(directory: str) -> tuple[dict[str, tuple[str, str]], dict[str, float], dict[str, tuple]]:
    """({name: (shard, key of z)}, {name: t}, {name: shape of z}) of a saliency directory."""
    index_path = os.path.join(directory, SALIENCY_INDEX)
    index = _read_json(index_path, "its index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UsageError(f"`saliency_dir`: {index_path} has no valid weight_map: recompute the saliency with prune")
    t, shapes = {}, {}
    for filename in sorted(set(weight_map.values())):
        path = os.path.join(directory, filename)
        if not os.path.isfile(path):
            raise UsageError(f"`saliency_dir`: {path} is listed in {SALIENCY_INDEX} but missing: copy the whole "
                             "saliency directory again")
        shard_t, shard_shapes = _shard_facts(path)
        t.update(shard_t)
        shapes.update(shard_shapes)
    entries = {key[:-2]: (os.path.join(directory, filename), key)
               for key, filename in weight_map.items() if key.endswith(".z") and key[:-2] in shapes}
    return entries, t, shapes


# ------------------------------------------------------------------ the state of a run in progress
def block_file(state_dir: str, index: int) -> str:
    return os.path.join(state_dir, f"block-{index:05d}.safetensors")


def save_block(state_dir: str, index: int, z: dict, t: dict, seconds: float, unseen: list[str]) -> None:
    """Record a finished block atomically: a killed run leaves it whole or absent."""
    with atomic_file(block_file(state_dir, index)) as tmp:
        save_file(_zt_tensors(list(z), z, t), tmp, metadata={"seconds": repr(seconds), "unseen": json.dumps(unseen)})


def load_block(state_dir: str, index: int, names: list[str] | None = None
               ) -> tuple[dict[str, float], float, list[str]] | None:
    """(thresholds, seconds, unseen matrices) of a finished block, or None; its z stays in the file. A file
    that cannot be read, or lacks one of `names`, counts as not done (what a crash before the disk was
    flushed can leave): it is removed and the block calibrated again."""
    path = block_file(state_dir, index)
    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            keys = set(handle.keys())
        saved = _thresholds(path), float(metadata["seconds"]), json.loads(metadata.get("unseen", "[]"))
        if names is not None and not all(f"{n}.z" in keys and n in saved[0] for n in names):
            raise KeyError("a matrix is missing")
    except (SafetensorError, OSError, ValueError, KeyError, IndexError, RuntimeError) as exc:
        log.info("the saved state of block %d (%s) is unreadable (%s): calibrating it again", index, path,
                 type(exc).__name__)
        with contextlib.suppress(OSError):
            os.remove(path)
        return None
    return saved


def block_entries(state_dir: str, index: int, names: list[str]) -> dict[str, tuple[str, str]]:
    """{name: (file, key)} of a finished block's z (for `stored_tensors`)."""
    path = block_file(state_dir, index)
    return {name: (path, f"{name}.z") for name in names}


def block_z(state_dir: str, index: int, names: list[str]) -> LazyMapping:
    """The z of a finished block's matrices, read from its file on access."""
    return stored_tensors(block_entries(state_dir, index, names))

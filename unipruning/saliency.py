"""The mirror-descent saliency (SPEC section 4): its state, the calibration loop, its files.

State per prunable matrix: z (float32, same shape as W) and the scalar threshold t; Gamma = max(z-t, 0)
is implicit. The loop is layer-streamed: block l sees the outputs of the dense blocks 0..l-1, every
calibration step updates the saliency of block l's linears from that step's activation statistics.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import backends, distributed, ops
from .config import PruneConfig, floor_count
from .errors import UsageError
from .inputs import observe
from .kernels.reference import derive_key
from .models import Matrix, block_matrices, decoder_blocks, fingerprint, model_matrices, weight_of
from .stream import BlockStream, LazyCheckpoint, capture_block_inputs, release_freed_memory

log = logging.getLogger("unipruning")

FORMAT_VERSION = 1
SALIENCY_CONFIG = "saliency_config.json"
SALIENCY_INDEX = "saliency.safetensors.index.json"


class LazyTensors(Mapping):
    """{name: tensor} read from safetensors files on access, one at a time: a saliency as large as the
    model never needs to be resident. entries: {name: (file, key)}, in the order to iterate."""

    def __init__(self, entries: dict[str, tuple[str, str]]):
        self.entries = entries

    def __getitem__(self, name: str) -> torch.Tensor:
        path, key = self.entries[name]
        with safe_open(path, framework="pt") as handle:
            return handle.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


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


def matrix_id(name: str) -> int:
    """A stable 32-bit id of a parameter name (keys the stochria subsets; same on every backend)."""
    return zlib.crc32(name.encode())


@dataclass
class Saliency:
    """z and t of every prunable matrix, plus how they were obtained (metadata)."""

    z: Mapping[str, torch.Tensor]  # a dict, or LazyTensors backed by files
    t: dict[str, float]
    metadata: dict = field(default_factory=dict)

    # ---------------------------------------------------------------------------------------- files
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
    def load(cls, directory: str, expect_fingerprint: str | None = None) -> Saliency:
        """Read a saliency directory; refuses another format version or (if given) another model."""
        meta_path = os.path.join(directory, SALIENCY_CONFIG)
        index_path = os.path.join(directory, SALIENCY_INDEX)
        if not (os.path.isfile(meta_path) and os.path.isfile(index_path)):
            raise UsageError(f"--saliency: {directory!r} is not a unipruning saliency directory")
        with open(meta_path) as f:
            metadata = json.load(f)
        version = metadata.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise UsageError(
                f"--saliency: format version {version} is not supported (this unipruning reads {FORMAT_VERSION})"
            )
        if expect_fingerprint is not None and metadata.get("fingerprint") != expect_fingerprint:
            raise UsageError("--saliency: it was computed for a different model (fingerprint mismatch)")
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        entries = {key[:-2]: (os.path.join(directory, filename), key)
                   for key, filename in weight_map.items() if key.endswith(".z")}
        t = {}
        for filename in sorted(set(weight_map.values())):
            t.update(_thresholds(os.path.join(directory, filename)))
        order = metadata.get("names", sorted(entries))
        # z stays on disk until a mask asks for it: masks are cut one matrix at a time
        return cls(z=LazyTensors({n: entries[n] for n in order}), t={n: t[n] for n in order}, metadata=metadata)

    def masks(self, weights: dict[str, torch.Tensor] | nn.Module, spec) -> dict[str, torch.Tensor]:
        """Keep masks for a MaskSpec; `weights` (a model or {name: W}) supplies the |W| tie-break."""
        from .masks import compute_masks

        if isinstance(weights, nn.Module):
            views = {m.name: weight_of(weights, m) for m in model_matrices(weights)}
            weights = {name: views[name].detach() for name in self.z}
        return compute_masks(self, weights, spec)


# ---------------------------------------------------------------------------------- calibration loop
class _ActStats:
    """Sum of x^2 over the tokens of the current step for one input source (models.Matrix.source)."""

    def __init__(self, features: int, device: torch.device, backend: str | None):
        self.sqsum = torch.zeros(features, dtype=torch.float64, device=device)
        self.tokens = 0
        self.backend = backend

    def add(self, x: torch.Tensor) -> None:
        self.tokens += ops.act_sqsum_(self.sqsum, x.detach(), backend=self.backend)

    def reset(self) -> None:
        self.sqsum.zero_()
        self.tokens = 0


def source_stats(model: nn.Module, matrices: list[Matrix], config: PruneConfig, backend: str) -> dict:
    """{source: _ActStats} of the inputs the matrices read (none for magnitude, which ignores X)."""
    if config.metric == "magnitude":
        return {}
    stats = {}
    for m in matrices:
        if m.source not in stats:
            stats[m.source] = _ActStats(m.shape[1], weight_of(model, m).device, backend)
    return stats


def mirror_step(
    z: torch.Tensor,
    threshold: tuple[float, int],
    weight: torch.Tensor,
    stats: _ActStats | None,
    config: PruneConfig,
    base_key: int,
    backend: str,
) -> tuple[float, int]:
    """One step k for one matrix: S_k, z update, new threshold t_k. `threshold` is (t_{k-1}, the hint
    its step returned): the hint lets a fused kernel gather t_k's candidates during the update."""
    sqsum, tokens = (stats.sqsum, stats.tokens) if stats is not None else (None, 0)
    row_inv, col_inv, col_scale = ops.step_vectors(weight, sqsum, tokens, config.metric, base_key, backend)
    m = max(1, floor_count(config.lam, z.numel()))
    t, hint = threshold
    return ops.mirror_step_(z, weight, row_inv, col_inv, col_scale, config.kappa, t, m, hint, backend=backend)


class MirrorState:
    """z, the threshold and the count of informative steps of each matrix, and the step that updates them
    from the activation statistics of one calibration step (shared by feedback none and full).

    A step in which a matrix's input saw no token (an MoE expert the router did not pick) carries no
    information about it: its saliency is left as it was. An expert never routed to keeps z = 0, so its
    mask is cut by |W| (the ranking's second key): the report lists such experts."""

    def __init__(self, model: nn.Module, matrices: list[Matrix], config: PruneConfig, backend: str):
        self.model, self.matrices, self.config, self.backend = model, matrices, config, backend
        self.z = {m.name: torch.zeros(m.shape, dtype=torch.float32, device=weight_of(model, m).device)
                  for m in matrices}
        self.thresholds = {m.name: (0.0, -1) for m in matrices}  # (t, hint for the next threshold; -1: none)
        self.steps = dict.fromkeys(self.z, 0)

    def update(self, k: int, stats: dict) -> None:
        for st in stats.values():  # other processes ran the other windows of this step
            st.sqsum, st.tokens = distributed.sum_over_ranks(st.sqsum, st.tokens)
        for m in self.matrices:
            st = stats.get(m.source)
            if st is not None and st.tokens == 0:
                continue
            base_key = derive_key(self.config.seed, matrix_id(m.name), k)
            self.thresholds[m.name] = mirror_step(self.z[m.name], self.thresholds[m.name], weight_of(self.model, m),
                                                  st, self.config, base_key, self.backend)
            self.steps[m.name] += 1

    def unseen(self) -> list[str]:
        return [name for name, count in self.steps.items() if count == 0]


def _calibrate_block(model, matrices: list[Matrix], stream: BlockStream, index: int, config: PruneConfig,
                     backend: str):
    """All steps of one block: its outputs replace its inputs in `stream`; returns (z, t, unseen) per
    matrix, unseen listing the matrices whose input never saw a token."""
    block = decoder_blocks(model)[index]
    stats = source_stats(model, matrices, config, backend)
    state = MirrorState(model, matrices, config, backend)
    with observe(model, list(stats), lambda source, x: stats[source].add(x)):
        for k in range(len(stream.hidden)):
            for s in stats.values():
                s.reset()
            stream.advance(block, index, k)
            state.update(k, stats)
    z = {name: value.cpu() for name, value in state.z.items()}
    return z, {name: state.thresholds[name][0] for name in z}, state.unseen()


def saliency_metadata(model: nn.Module, config: PruneConfig, windows: torch.Tensor, names: list[str],
                      unseen: list[str]) -> dict:
    """How a saliency was obtained (stored in its directory; `mask` checks the fingerprint)."""
    shapes = {m.name: m.shape for m in model_matrices(model)}  # meta-device blocks keep their shapes
    return {
        "fingerprint": fingerprint(model.config, {name: shapes[name] for name in names}),
        "metric": config.metric,
        "kappa": config.kappa,
        "lam": config.lam,
        "steps": int(windows.shape[0]) // config.batch_size,
        "batch_size": config.batch_size,
        "nsamples": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "feedback": config.feedback,
        "seed": config.seed,
        "names": names,
        "unseen": unseen,
    }


def steps_of(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    if windows.shape[0] % batch_size:
        raise UsageError(
            f"--batch-size {batch_size} must divide --nsamples {windows.shape[0]} (every step has one shape)"
        )
    return list(windows.split(batch_size))


def _block_file(state_dir: str, index: int) -> str:
    return os.path.join(state_dir, f"block-{index:05d}.safetensors")


def _save_block(state_dir: str, index: int, z: dict, t: dict, seconds: float, unseen: list[str]) -> None:
    """Atomically record a finished block (a rename: a killed run leaves it whole or absent)."""
    tensors = _zt_tensors(list(z), z, t)
    path = _block_file(state_dir, index)
    save_file(tensors, path + ".tmp", metadata={"seconds": repr(seconds), "unseen": json.dumps(unseen)})
    os.replace(path + ".tmp", path)


def _load_block(state_dir: str, index: int) -> tuple[dict[str, float], float, list[str]] | None:
    """(thresholds, seconds, unseen matrices) of a finished block, or None; its z stays in the file."""
    path = _block_file(state_dir, index)
    if not os.path.isfile(path):
        return None
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    return _thresholds(path), float(metadata["seconds"]), json.loads(metadata.get("unseen", "[]"))


@torch.no_grad()
def calibrate(
    model: nn.Module,
    windows: torch.Tensor,
    config: PruneConfig,
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
    checkpoint: LazyCheckpoint | None = None,
    state_dir: str | None = None,
    offload: str = "auto",
    on_block: Callable[[int, Mapping[str, torch.Tensor]], None] | None = None,
) -> tuple[Saliency, list[dict]]:
    """Learn the saliency of every prunable matrix, block by block. Returns it and per-block timings.

    windows: (nsamples, seqlen) token ids; steps of `config.batch_size` windows each. The model's
    weights are not changed. Each block is moved to `device` while it is calibrated, then back; with
    a `checkpoint` (the model being its meta-device skeleton) each block is read from the shards
    instead and released afterwards, so only one block is ever resident. With a `state_dir`, every
    finished block's saliency is saved there, and blocks found there are not calibrated again: their
    forward passes are replayed to rebuild the next block's inputs (a resumed run gives the same bytes).
    offload: where the activations live between blocks (stream.activation_home). on_block(index, z of its
    matrices) is called when a block's saliency is final (also for blocks found done in `state_dir`).
    """
    backend = backends.resolve(config.backend, device)
    steps = steps_of(windows, config.batch_size)
    stream: BlockStream = capture_block_inputs(model, [distributed.share(b) for b in steps], device, offload)
    z: dict = {}  # {name: z}, or {name: (block file, key)} with a state_dir
    t: dict[str, float] = {}
    unseen: list[str] = []  # matrices whose input never saw a token (experts never routed to)
    per_block = []
    blocks = decoder_blocks(model)
    for index, block in enumerate(blocks):
        start = time.perf_counter()
        home = next(block.parameters()).device
        if checkpoint is None:
            block.to(device)
        else:
            checkpoint.load_block(model, index, device, next(model.parameters()).dtype)
        saved = _load_block(state_dir, index) if state_dir else None
        matrices = block_matrices(model, index)
        names = [m.name for m in matrices]
        try:
            if saved is None:
                block_z, block_t, block_unseen = _calibrate_block(model, matrices, stream, index, config, backend)
                seconds = time.perf_counter() - start
                if state_dir and distributed.is_main():
                    _save_block(state_dir, index, block_z, block_t, seconds, block_unseen)
            else:
                saved_t, seconds, block_unseen = saved  # files list names sorted: restore the family's order
                block_z, block_t = None, {n: saved_t[n] for n in names}
                for k in range(len(steps)):
                    stream.advance(block, index, k)
        finally:
            if checkpoint is None:
                block.to(home)
            else:
                checkpoint.release_block(model, index)
        if state_dir:  # the block's z stays in its file: memory holds one block, whatever the depth
            path = _block_file(state_dir, index)
            z.update({name: (path, f"{name}.z") for name in names})
        else:
            z.update(block_z)
        entry = {"block": index, "seconds": seconds, "matrices": len(block_t), "resumed": saved is not None}
        if on_block is not None:  # prune writes the block's pruned shard here: timed apart from calibration
            start = time.perf_counter()
            on_block(index, block_z if block_z is not None else LazyTensors({n: z[n] for n in names}))
            entry["write_seconds"] = time.perf_counter() - start
        t.update(block_t)
        unseen.extend(block_unseen)
        per_block.append(entry)
        del block_z, saved
        release_freed_memory()
        if progress is not None:
            progress(index + 1, len(blocks))
    metadata = saliency_metadata(model, config, windows, list(z), unseen)
    return Saliency(z=LazyTensors(z) if state_dir else z, t=t, metadata=metadata), per_block

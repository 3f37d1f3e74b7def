"""Layer-streamed calibration (feedback none): the saliency of every prunable matrix, block by block.

Block l sees the outputs of the dense blocks 0..l-1; every calibration step updates the saliency of
block l's matrices from that step's activation statistics (algorithm/mirror.py). With a checkpoint (the
model being its meta-device skeleton) each block is read from the shards when its turn comes and
released afterwards, so only one block is ever resident. With a state directory every finished block's
saliency is saved there, and blocks found there are not calibrated again: their forward passes are
replayed to rebuild the next block's inputs, so a resumed run gives the same bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .. import backends
from ..algorithm import closed_form
from ..algorithm.masks import floor_count
from ..algorithm.metrics import ActivationStats, step_key
from ..algorithm.mirror import MirrorState
from ..config import PruneConfig
from ..io import saliency as store
from ..io.checkpoint import LazyCheckpoint
from ..io.saliency import Saliency
from ..models import Matrix, block_matrices, decoder_blocks, fingerprint, model_matrices, weight_of
from ..progress import steps_of as steps_of_progress
from . import distributed
from .inputs import observe
from .stream import BlockStream, capture_block_inputs, release_freed_memory


def steps_of(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The calibration steps: consecutive groups of `batch_size` windows (config.Calibration.steps
    has checked that they divide evenly)."""
    return list(windows.split(batch_size))


def source_stats(model: nn.Module, matrices: list[Matrix], config: PruneConfig, backend: str) -> dict:
    """{source: ActivationStats} of the inputs the matrices read (none for magnitude, which ignores X)."""
    if config.metric == "magnitude":
        return {}
    stats = {}
    for m in matrices:
        if m.source not in stats:
            stats[m.source] = ActivationStats(m.shape[1], weight_of(model, m).device, backend)
    return stats


def mirror_state(model: nn.Module, matrices: list[Matrix], config: PruneConfig, backend: str) -> MirrorState:
    """A fresh saliency state for `matrices`, each z on the device of its weight."""
    return MirrorState({m.name: m.shape for m in matrices},
                       {m.name: weight_of(model, m).device for m in matrices}, config, backend)


def mirror_update(state: MirrorState, model: nn.Module, matrices: list[Matrix], k: int, stats: dict) -> None:
    """Step k of `state` from this process's statistics and the other processes' (data parallelism)."""
    for st in stats.values():
        st.sqsum, st.tokens = distributed.sum_over_ranks(st.sqsum, st.tokens)
    state.update(k, {m.name: weight_of(model, m) for m in matrices}, {m.name: m.source for m in matrices}, stats)


def _calibrate_block(model, matrices: list[Matrix], stream: BlockStream, index: int, config: PruneConfig,
                     backend: str):
    """All steps of one block: its outputs replace its inputs in `stream`; returns (z, t, unseen) of its
    matrices, unseen listing those whose input never saw a token."""
    block = decoder_blocks(model)[index]
    stats = source_stats(model, matrices, config, backend)
    state = mirror_state(model, matrices, config, backend)
    with observe(model, list(stats), lambda source, x: stats[source].add(x)):
        for k in range(len(stream.hidden)):
            for s in stats.values():
                s.reset()
            stream.advance(block, index, k)
            mirror_update(state, model, matrices, k, stats)
    return {name: value.cpu() for name, value in state.z.items()}, dict(state.t), state.unseen()


def _step_history(model, matrices: list[Matrix], stream: BlockStream, index: int, config: PruneConfig,
                  backend: str) -> dict[str, list[tuple[torch.Tensor, int]]]:
    """All steps of one block, recording each input's statistics per step ({source: [(sqsum, tokens)]},
    summed over the data-parallel processes): all the closed form needs. Its outputs replace its inputs."""
    block = decoder_blocks(model)[index]
    stats = source_stats(model, matrices, config, backend)
    history: dict[str, list] = {source: [] for source in stats}
    with observe(model, list(stats), lambda source, x: stats[source].add(x)):
        for k in range(len(stream.hidden)):
            for s in stats.values():
                s.reset()
            stream.advance(block, index, k)
            for source, st in stats.items():
                sqsum, tokens = distributed.sum_over_ranks(st.sqsum, st.tokens)
                history[source].append((sqsum.clone(), tokens))
    return history


def _closed_form_block(model, matrices: list[Matrix], stream: BlockStream, index: int, config: PruneConfig,
                       backend: str):
    """(z, t, unseen) of one block's matrices from the closed form (algorithm/closed_form.py); a step in
    which a matrix's input saw no token is left out, as the exact recursion leaves it."""
    history = _step_history(model, matrices, stream, index, config, backend)
    steps = len(stream.hidden)
    z, t, unseen = {}, {}, []
    for m in matrices:
        weight = weight_of(model, m)
        records = history.get(m.source, [(None, 0)] * steps)
        informative = [k for k, (_, tokens) in enumerate(records) if tokens > 0 or m.source not in history]
        if not informative:
            z[m.name], t[m.name] = torch.zeros(m.shape, dtype=torch.float32), 0.0
            unseen.append(m.name)
            continue
        vectors = closed_form.step_vectors(weight, [records[k][0] for k in informative],
                                           [records[k][1] for k in informative], config.metric,
                                           [step_key(config.seed, m.name, k) for k in informative])
        zm, tm = closed_form.saliency(weight, vectors, config.kappa, max(1, floor_count(config.lam, weight.numel())),
                                      backend)
        z[m.name], t[m.name] = zm.cpu(), float(tm)  # the host waits here, once per matrix and block
    return z, t, unseen


def learn_block(model, matrices: list[Matrix], stream: BlockStream, index: int, config: PruneConfig, backend: str):
    """(z, t, unseen) of one resident block's matrices over every step of `stream`, in closed form or by the
    exact recursion (config.closed_form); its outputs replace its inputs in `stream`."""
    learn = _closed_form_block if config.closed_form else _calibrate_block
    return learn(model, matrices, stream, index, config, backend)


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
        "saliency_update": "closed-form" if config.closed_form else "exact",
        "names": names,
        "unseen": unseen,
    }


@dataclass
class _Block:
    """One block's outcome: z of its matrices (or None: kept in the state file), t, timing, unseen."""

    z: Mapping[str, torch.Tensor] | None
    t: dict[str, float]
    seconds: float
    unseen: list[str]
    resumed: bool


def _run_block(model, stream: BlockStream, index: int, config: PruneConfig, backend: str, state_dir: str | None,
               steps: int, start: float) -> _Block:
    """Calibrate block `index` (already on the device), or replay it when `state_dir` has it."""
    matrices = block_matrices(model, index)
    saved = store.load_block(state_dir, index, [m.name for m in matrices]) if state_dir else None
    if saved is None:
        z, t, unseen = learn_block(model, matrices, stream, index, config, backend)
        seconds = time.perf_counter() - start
        if state_dir and distributed.is_main():
            store.save_block(state_dir, index, z, t, seconds, unseen)
        return _Block(z, t, seconds, unseen, resumed=False)
    saved_t, seconds, unseen = saved  # the file lists names sorted: restore the family's order
    block = decoder_blocks(model)[index]
    for k in range(steps):
        stream.advance(block, index, k)
    return _Block(None, {m.name: saved_t[m.name] for m in matrices}, seconds, unseen, resumed=True)


@torch.no_grad()
def calibrate(
    model: nn.Module,
    windows: torch.Tensor,
    config: PruneConfig,
    device: torch.device,
    checkpoint: LazyCheckpoint | None = None,
    state_dir: str | None = None,
    on_block: Callable[[int, Mapping[str, torch.Tensor]], None] | None = None,
    offload: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Saliency, list[dict]]:
    """Learn the saliency of every prunable matrix, block by block; returns it and per-block timings.

    windows: (nsamples, seqlen) token ids; steps of `config.batch_size` windows each. The model's
    weights are not changed. Each block is moved to `device` while it is calibrated (or, with a
    `checkpoint`, read there). on_block(index, z of its matrices) is called when a block's saliency is
    final (also for blocks found done in `state_dir`); offload: where the activations live between
    blocks (stream.activation_home); progress(done, total) before the first block and after each (a
    progress.Progress also shows the steps inside a block)."""
    backend = backends.resolve(config.backend, device)
    steps = steps_of(windows, config.batch_size)
    stream = capture_block_inputs(model, [distributed.share(b) for b in steps], device, offload)
    stream.on_step = steps_of_progress(progress)
    z: dict = {}  # {name: z}; with a state_dir {name: (block file, key)}: memory holds one block's z
    t: dict[str, float] = {}
    unseen: list[str] = []  # matrices whose input never saw a token (experts never routed to)
    per_block = []
    blocks = decoder_blocks(model)
    if progress is not None:
        progress(0, len(blocks))  # the bar shows before block 0, the slowest (it waits for the first steps)
    for index in range(len(blocks)):
        done = _resident_block(model, checkpoint, index, device, stream, config, backend, state_dir, len(steps))
        names = list(done.t)
        z.update(store.block_entries(state_dir, index, names) if state_dir else done.z)
        entry = {"block": index, "seconds": done.seconds, "matrices": len(names), "resumed": done.resumed}
        if on_block is not None:  # prune writes the block's pruned shard here: timed apart from calibration
            start = time.perf_counter()
            on_block(index, done.z if done.z is not None else store.block_z(state_dir, index, names))
            entry["write_seconds"] = time.perf_counter() - start
        t.update(done.t)
        unseen.extend(done.unseen)
        per_block.append(entry)
        del done
        release_freed_memory()
        if progress is not None:
            progress(index + 1, len(blocks))
    metadata = saliency_metadata(model, config, windows, list(z), unseen)
    return Saliency(z=store.stored_tensors(z) if state_dir else z, t=t, metadata=metadata), per_block


def _resident_block(model: nn.Module, checkpoint: LazyCheckpoint | None, index: int, device: torch.device,
                    stream: BlockStream, config: PruneConfig, backend: str, state_dir: str | None,
                    steps: int) -> _Block:
    """Block `index` made resident on `device` (moved there, or read from the checkpoint), run, released."""
    start = time.perf_counter()
    block = decoder_blocks(model)[index]
    home = next(block.parameters()).device
    if checkpoint is None:
        block.to(device)
    else:
        checkpoint.load_block(model, index, device, next(model.parameters()).dtype)
    try:
        return _run_block(model, stream, index, config, backend, state_dir, steps, start)
    finally:
        if checkpoint is None:
            block.to(home)
        else:
            checkpoint.release_block(model, index)

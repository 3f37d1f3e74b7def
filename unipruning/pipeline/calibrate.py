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

from ..algorithm import closed_form
from ..algorithm.masks import floor_count
from ..algorithm.metrics import ActivationStats, step_key
from ..algorithm.mirror import MirrorState
from ..config import PruneConfig
from ..io import saliency as store
from ..io.saliency import Saliency
from ..models import Matrix, block_matrices, decoder_blocks, fingerprint, model_matrices, weight_of
from . import distributed
from .blocks import for_each_block, open_stream
from .inputs import observe
from .job import Job
from .stream import BlockStream


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


class _Calibration:
    """The calibration pass over the blocks (blocks.BlockPass): each block's saliency learned over every step
    (or, found in `state_dir`, replayed to rebuild the next block's inputs), collected into one Saliency;
    on_block(index, z) once the block has left the device."""

    def __init__(self, job: Job, model: nn.Module, config: PruneConfig, state_dir: str | None, on_block,
                 keep: bool = True):
        self.job, self.model, self.config, self.state_dir, self.on_block = job, model, config, state_dir, on_block
        self.keep = keep  # False: a torchrun worker, which only takes its part in every step
        self.stream = open_stream(job, model, shared=True)
        self.z: dict = {}  # {name: z}; with a state_dir {name: (block file, key)}: memory holds one block's z
        self.t: dict[str, float] = {}
        self.unseen: list[str] = []  # matrices whose input never saw a token (experts never routed to)
        self.done: _Block | None = None

    def visit(self, index: int, block: nn.Module, started: float) -> dict:
        matrices = block_matrices(self.model, index)
        saved = store.load_block(self.state_dir, index, [m.name for m in matrices]) if self.state_dir else None
        if not distributed.agree(saved is not None, self.job.device):  # rank 0's state decides for every process
            z, t, unseen = learn_block(self.model, matrices, self.stream, index, self.config, self.job.backend)
            seconds = time.perf_counter() - started
            if self.state_dir and distributed.is_main():
                store.save_block(self.state_dir, index, z, t, seconds, unseen)
            self.done = _Block(z if self.keep else {}, t, seconds, unseen, resumed=False)
        else:
            for k in range(len(self.stream.hidden)):
                self.stream.advance(block, index, k)
            if saved is None:  # a worker, whose rank 0 replays this block: nothing of it to keep
                self.done = _Block({}, {}, 0.0, [], resumed=True)
            else:
                saved_t, seconds, unseen = saved  # the file lists names sorted: restore the family's order
                self.done = _Block(None, {m.name: saved_t[m.name] for m in matrices}, seconds, unseen, resumed=True)
        return {"block": index, "seconds": self.done.seconds, "matrices": len(matrices),
                "resumed": self.done.resumed}

    def after(self, index: int, entry: dict) -> None:
        done, names = self.done, list(self.done.t)
        self.z.update(store.block_entries(self.state_dir, index, names) if self.state_dir else done.z)
        if self.on_block is not None:  # prune writes the block's pruned shard here: timed apart from calibration
            start = time.perf_counter()
            self.on_block(index, done.z if done.z is not None else store.block_z(self.state_dir, index, names))
            entry["write_seconds"] = time.perf_counter() - start
        self.t.update(done.t)
        self.unseen.extend(done.unseen)
        self.done = None

    def saliency(self) -> Saliency:
        metadata = saliency_metadata(self.model, self.config, self.job.windows, list(self.z), self.unseen)
        return Saliency(z=store.stored_tensors(self.z) if self.state_dir else self.z, t=self.t, metadata=metadata)


def calibrate(job: Job, model: nn.Module, config: PruneConfig, state_dir: str | None = None,
              on_block: Callable[[int, Mapping[str, torch.Tensor]], None] | None = None, keep: bool = True
              ) -> tuple[Saliency, list[dict]]:
    """Learn the saliency of every prunable matrix of `model` (the job's skeleton, or a model in memory),
    block by block; returns it and per-block timings.

    The job's windows make the steps (`job.batch_size` windows each; this process's share of each under
    torchrun, where rank 0's `state_dir` says which blocks are done). The model's weights are not changed.
    on_block(index, z of its matrices) is called when a block's saliency is final (also for blocks found
    done in `state_dir`). keep False: a torchrun worker's part in the steps, no saliency kept."""
    calibration = _Calibration(job, model, config, state_dir, on_block, keep)
    per_block = for_each_block(job, model, calibration)
    return calibration.saliency(), per_block

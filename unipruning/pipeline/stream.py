"""Layer-streamed execution (docs/method.md, "Streaming"): capture the first block's inputs, then run block by block.

`capture_block_inputs` runs the model once per calibration step with every decoder block replaced by a
recorder: block 0's recorder keeps the hidden states, every block's recorder keeps the keyword
arguments it is called with (attention mask, position ids, position embeddings...), so layers of
different attention types (sliding/global) each get their own, and the last one stops the forward.
Blocks are never computed here. `BlockStream` then holds the activations between blocks: one dense
stream today; the pruned stream of weight reconstruction will sit beside it.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import OFFLOAD_MODES
from ..errors import UsageError
from ..models import decoder_blocks


class StopForward(Exception):
    """Raised by a hook to end a forward pass once it has seen what it needed."""


class _Recorder(nn.Module):
    """Stands in for decoder block `index` during capture: records, passes hidden states through."""

    def __init__(self, index: int, last: int, sink: dict):
        super().__init__()
        self.index, self.last, self.sink = index, last, sink

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise TypeError("decoder blocks are expected to take keyword arguments after hidden_states")
        if self.index == 0:
            self.sink["hidden"] = hidden_states
        self.sink["kwargs"][self.index] = kwargs
        if self.index == self.last:
            raise StopForward
        return hidden_states


def _block_kwargs(kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    kwargs["use_cache"] = False
    return kwargs


MAX_TOKENS = 16384  # tokens per forward: a step's windows run in micro-batches of at most this many


def _batch_slice(value, start: int, stop: int, batch: int):
    """A block keyword argument restricted to windows [start, stop) of a batch of `batch` (tensors whose
    first dimension is the batch; broadcast ones, and everything else, unchanged)."""
    if isinstance(value, torch.Tensor):
        return value[start:stop] if batch > 1 and value.dim() >= 1 and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_batch_slice(v, start, stop, batch) for v in value)
    return value


class _Transfers:
    """Copies of offloaded activations, one micro-batch ahead, on a side CUDA stream, so that the PCIe
    traffic of pinned-memory activations overlaps the block's compute instead of adding to it.

    fetch(src, ahead) returns `src` on the device (already there if it was the previous call's `ahead`)
    and starts copying `ahead`, the next micro-batch; store(dst, out) copies a block output back. Both
    copies run on the side stream, ordered after what the compute stream has queued (a CPU buffer may
    still be being written by an earlier store), and the compute stream waits for a copy before it reads
    it. On a CPU device (tests) the same bookkeeping runs with plain copies."""

    def __init__(self, device: torch.device):
        self.device = device
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ahead: tuple[tuple, torch.Tensor] | None = None  # (key of its source, its device copy)
        self.prefetched = 0  # fetches served by the previous call's copy (tests count them)

    @staticmethod
    def _key(src: torch.Tensor) -> tuple:
        return src.data_ptr(), tuple(src.shape)

    def _copy(self, src: torch.Tensor) -> torch.Tensor:
        if self.side is None:
            return src.to(self.device, copy=True)
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            return src.to(self.device, non_blocking=True)

    def fetch(self, src: torch.Tensor, ahead: torch.Tensor | None) -> torch.Tensor:
        if self.ahead is not None and self.ahead[0] == self._key(src):
            x = self.ahead[1]
            self.prefetched += 1
        else:
            x = self._copy(src)
        self.ahead = None
        if self.side is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self.side)  # before the next copy is queued: compute waits for x only
            x.record_stream(compute)  # x was allocated on the side stream
        if ahead is not None:
            self.ahead = (self._key(ahead), self._copy(ahead))
        return x

    def store(self, dst: torch.Tensor, out: torch.Tensor) -> None:
        if self.ahead is not None and self.ahead[0][0] == dst.data_ptr():
            self.ahead = None  # its source is being overwritten
        if self.side is None:
            dst.copy_(out)
            return
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            dst.copy_(out, non_blocking=True)
        out.record_stream(self.side)


@dataclass
class BlockStream:
    """Activations between blocks: hidden[k] is the (B, L, H) input of the current block at step k;
    kwargs[l] the keyword arguments of block l (identical for all steps: every step has the same
    window shape).

    The activations live on the compute device, or, `offloaded`, in pinned CPU memory (`device` is then
    the compute device): each micro-batch is copied in ahead of its forward and its output copied back
    into the rows it came from, both on a side stream (_Transfers). A step's windows run in micro-batches
    of at most `max_tokens` tokens, so a large --batch-size never needs the MLP intermediate of all its
    tokens at once. on_step(done, steps), when set, is told of each step a block has advanced (progress)."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]
    device: torch.device | None = None
    max_tokens: int = MAX_TOKENS
    offloaded: bool = False
    transfers: _Transfers | None = field(default=None, init=False, repr=False)
    on_step: Callable[[int, int], None] | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.offloaded:
            self.transfers = _Transfers(self.device)

    def _chunks(self, step: int) -> list[tuple[int, int]]:
        batch, length = self.hidden[step].shape[0], self.hidden[step].shape[1]
        per = max(1, self.max_tokens // max(length, 1))
        return [(start, min(start + per, batch)) for start in range(0, batch, per)]

    def _input(self, step: int, chunks: list[tuple[int, int]], j: int) -> torch.Tensor:
        start, stop = chunks[j]
        x = self.hidden[step][start:stop]
        if self.transfers is None:
            return x.to(self.device or x.device, non_blocking=True)
        if j + 1 < len(chunks):
            ahead = self.hidden[step][chunks[j + 1][0]:chunks[j + 1][1]]
        elif step + 1 < len(self.hidden):
            ahead = self.hidden[step + 1][:self._chunks(step + 1)[0][1]]
        else:
            ahead = None
        return self.transfers.fetch(x, ahead)

    def run(self, block: nn.Module, index: int, step: int, partial: bool = False, sink=None) -> torch.Tensor | None:
        """The block's output for step `step` (on the compute device). partial: a hook stops each forward
        early (StopForward) once it has what it needs; nothing is returned. sink(start, stop, out), when
        given, takes each micro-batch's output instead (nothing is returned either)."""
        batch = self.hidden[step].shape[0]
        chunks = self._chunks(step)
        outs = []
        for j, (start, stop) in enumerate(chunks):
            kwargs = {k: _batch_slice(v, start, stop, batch) for k, v in self.kwargs[index].items()}
            try:
                out = block(self._input(step, chunks, j), **kwargs)
            except StopForward:
                if not partial:
                    raise
                continue
            out = out[0] if isinstance(out, (tuple, list)) else out
            if sink is not None:
                sink(start, stop, out)
            else:
                outs.append(out)
        if partial or sink is not None:
            return None
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def advance(self, block: nn.Module, index: int, step: int) -> None:
        """Replace step `step`'s input by the block's output (the next block's input)."""
        if self.transfers is not None:  # each micro-batch's output goes back into its own rows
            dst = self.hidden[step]
            self.run(block, index, step, sink=lambda start, stop, out: self.transfers.store(dst[start:stop], out))
        else:
            self.hidden[step] = self.run(block, index, step)  # not offloaded: already on the compute device
        if self.on_step is not None:
            self.on_step(step + 1, len(self.hidden))


def activation_home(device: torch.device, nbytes: int, offload: str) -> torch.device:
    """Where the activations live: on the compute device, or on the CPU (pinned) with offload 'always',
    or 'auto' when they would take more than a third of the GPU's free memory."""
    if offload not in OFFLOAD_MODES:
        raise UsageError(f"`offload`: expected one of {', '.join(OFFLOAD_MODES)}, got {offload!r}")
    if device.type != "cuda" or offload == "never":
        return device
    if offload == "always" or nbytes > torch.cuda.mem_get_info(device)[0] / 3:
        return torch.device("cpu")
    return device


def _embedding_side(model: nn.Module) -> list[nn.Module]:
    """Every module outside the decoder blocks (embeddings, rotary tables, norms, head)."""
    blocks = decoder_blocks(model)
    inside = {id(m) for m in blocks.modules()}
    return [m for m in model.modules() if id(m) not in inside and not list(m.children())]


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, steps: list[torch.Tensor], device: torch.device, offload: str = "auto"
) -> BlockStream:
    """Inputs of decoder block 0 for each step's batch (B, L) of token ids, computed on `device` and kept
    where `activation_home` says (see BlockStream)."""
    hidden_size = int(model.config.hidden_size)
    itemsize = next(p for p in model.parameters() if not p.is_meta).element_size()
    home = activation_home(device, sum(ids.numel() for ids in steps) * hidden_size * itemsize, offload)
    pin = home.type == "cpu" and device.type == "cuda"
    blocks = decoder_blocks(model)
    originals = list(blocks)
    leaves = _embedding_side(model)
    homes = [next(m.parameters(), torch.empty(0)).device for m in leaves]
    sink: dict = {"kwargs": {}}
    hidden: list[torch.Tensor] = []
    kwargs: list[dict] = []
    try:
        for m in leaves:
            m.to(device)
        for i in range(len(blocks)):
            blocks[i] = _Recorder(i, len(blocks) - 1, sink)
        for k, ids in enumerate(steps):
            sink["kwargs"] = {}
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except StopForward:
                pass
            h = sink.pop("hidden")
            hidden.append(h if home == h.device else h.to(home).pin_memory() if pin else h.to(home))
            if k == 0:
                kwargs = [_block_kwargs(sink["kwargs"][i]) for i in range(len(blocks))]
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
        for m, original in zip(leaves, homes, strict=True):
            m.to(original)
    return BlockStream(hidden=hidden, kwargs=kwargs, device=device, max_tokens=MAX_TOKENS,
                       offloaded=home.type != device.type)


def release_freed_memory() -> None:
    """Collect cyclic garbage and hand the allocator's free pages back to the OS (glibc malloc_trim).

    Between blocks, the memory of the previous block is free but may stay in the allocator's arenas
    (torch's worker threads allocate from several), fragmented by small long-lived objects; peak RSS
    then creeps up with depth by chance. Trimming after each block keeps it at what is live."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass

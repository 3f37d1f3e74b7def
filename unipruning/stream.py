"""Layer-streamed execution (SPEC section 6): capture the first block's inputs, then run block by block.

`capture_block_inputs` runs the model once per calibration step with every decoder block replaced by a
recorder: block 0's recorder keeps the hidden states, every block's recorder keeps the keyword
arguments it is called with (attention mask, position ids, position embeddings...), so layers of
different attention types (sliding/global) each get their own, and the last one stops the forward.
Blocks are never computed here. `BlockStream` then holds the activations between blocks: one dense
stream today; the pruned stream of weight reconstruction will sit beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .models import decoder_blocks


class _StopForward(Exception):
    pass


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
            raise _StopForward
        return hidden_states


def _block_kwargs(kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    kwargs["use_cache"] = False
    return kwargs


@dataclass
class BlockStream:
    """Activations between blocks: hidden[k] is the (B, L, H) input of the current block at step k;
    kwargs[l] the keyword arguments of block l (identical for all steps: every step has the same
    window shape)."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]

    def run(self, block: nn.Module, index: int, step: int) -> torch.Tensor:
        out = block(self.hidden[step], **self.kwargs[index])
        return out[0] if isinstance(out, (tuple, list)) else out


def _embedding_side(model: nn.Module) -> list[nn.Module]:
    """Every module outside the decoder blocks (embeddings, rotary tables, norms, head)."""
    blocks = decoder_blocks(model)
    inside = {id(m) for m in blocks.modules()}
    return [m for m in model.modules() if id(m) not in inside and not list(m.children())]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, steps: list[torch.Tensor], device: torch.device) -> BlockStream:
    """Inputs of decoder block 0 for each step's batch (B, L) of token ids, on `device`."""
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
            except _StopForward:
                pass
            hidden.append(sink.pop("hidden"))
            if k == 0:
                kwargs = [_block_kwargs(sink["kwargs"][i]) for i in range(len(blocks))]
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
        for m, home in zip(leaves, homes, strict=True):
            m.to(home)
    return BlockStream(hidden=hidden, kwargs=kwargs)

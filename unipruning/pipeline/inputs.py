"""Where each prunable matrix's input is seen: forward pre-hooks on nn.Linear modules, and for MoE
experts (3-D parameters, no nn.Linear to hook) an instrumented copy of transformers' eager expert loop.

A matrix's `source` (models.Matrix) names its input: the path of its nn.Linear (every part of a fused
linear reads the same input), or `<experts path>[e].in` (the tokens routed to expert e, read by its gate
and up rows) and `<experts path>[e].mid` (act(gate) * up, read by its down projection).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F


def experts_forward(module: nn.Module, record: Callable[[int, str, torch.Tensor], None]):
    """transformers v5's eager MoE expert loop (Mixtral, Qwen2-MoE, Qwen3-MoE: the same code), calling
    record(expert, "in" | "mid", x) with each routed expert's two inputs. Same operations in the same
    order as the original, so the outputs are bit-identical (tests/test_families.py)."""

    def forward(hidden_states, top_k_index, top_k_weights):
        final = torch.zeros_like(hidden_states)
        count = module.num_experts
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=count + 1).permute(2, 1, 0)
            hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for row in hit:
            e = int(row[0])
            if e == count:
                continue
            position, token = torch.where(expert_mask[e])
            x = hidden_states[token]
            record(e, "in", x)
            gate, up = F.linear(x, module.gate_up_proj[e]).chunk(2, dim=-1)
            h = module.act_fn(gate) * up
            record(e, "mid", h)
            out = F.linear(h, module.down_proj[e]) * top_k_weights[token, position, None]
            final.index_add_(0, token, out.to(final.dtype))
        return final

    return forward


def _is_experts(module: nn.Module) -> bool:
    return isinstance(getattr(module, "gate_up_proj", None), nn.Parameter) and module.gate_up_proj.dim() == 3


@contextlib.contextmanager
def observe(model: nn.Module, sources: list[str], seen: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Within the context, seen(source, x) is called with every input `x` of the named sources (module
    paths in `model`, or expert sources) as the model computes."""
    handles: list = []
    patched: list[nn.Module] = []
    experts: dict[str, set[str]] = {}
    for source in sources:
        path = source.rsplit("[", 1)[0] if source.endswith((".in", ".mid")) and "[" in source else source
        module = model.get_submodule(path)
        if _is_experts(module):
            experts.setdefault(path, set()).add(source)
        else:
            handles.append(module.register_forward_pre_hook(lambda m, args, s=source: seen(s, args[0])))
    try:
        for path, wanted in experts.items():
            module = model.get_submodule(path)

            def record(e: int, kind: str, x: torch.Tensor, path=path, wanted=wanted) -> None:
                source = f"{path}[{e}].{kind}"
                if source in wanted:
                    seen(source, x)

            module.forward = experts_forward(module, record)  # an instance attribute shadows the class's
            patched.append(module)
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in patched:
            del module.forward

"""Perplexity with the standard protocol: documents joined with "\n\n", non-overlapping windows of
`seqlen` tokens, mean next-token negative log-likelihood over every predicted token."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 8) -> float:
    """exp(mean NLL) of `model` over (n, seqlen) token windows (each predicts seqlen - 1 tokens)."""
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for batch in windows.split(batch_size):
        ids = batch.to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        total_tokens += ids[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


def evaluate_checkpoint(
    model_dir: str, data: str, seqlen: int, device_name: str = "auto", dtype_name: str = "auto",
    tokenizer_dir: str | None = None, batch_size: int = 8,
) -> dict:
    """`unipruning eval`: perplexity of a checkpoint directory on a text source."""
    from .api import load_tokenizer
    from .data import eval_windows
    from .models import load_config, load_model, resolve_device, resolve_dtype

    config = load_config(model_dir)
    device = resolve_device(device_name)
    tokenizer = load_tokenizer(tokenizer_dir or model_dir)
    windows = eval_windows(tokenizer, data, seqlen)
    model = load_model(model_dir, resolve_dtype(dtype_name, config, device)).to(device)
    ppl = perplexity(model, windows, device, batch_size)
    return {"model": model_dir, "data": data, "seqlen": seqlen, "windows": int(windows.shape[0]),
            "tokens": int(windows.numel()), "perplexity": ppl}

"""The toy model of the tiny-model benchmarks (benchmarks/quality.py): a small Llama trained here on text, seeded.

It was once `unipruning demo`'s model; the demo now prunes a real pretrained model (unipruning/demo_model.py),
so the toy training lives with the benchmark that still uses it. A model is trained once per recipe and texts and
cached (UNIPRUNING_CACHE, else ~/.cache/unipruning).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests._utils import train_tokenizer  # noqa: E402
from unipruning.io.identity import cache_root  # noqa: E402
from unipruning.io.staging import out_lock, staged_directory  # noqa: E402
from unipruning.progress import Progress, bar_of  # noqa: E402

log = logging.getLogger("unipruning")


@dataclass(frozen=True)
class TinyLlama:
    """Model and training recipe of the demo (the quality benchmark uses a larger one)."""

    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    seqlen: int = 128
    batch_size: int = 16
    train_steps: int = 500
    lr: float = 3e-3
    seed: int = 0
    tie_word_embeddings: bool = False


def build_model(recipe: TinyLlama, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        max_position_embeddings=max(256, recipe.seqlen),
        tie_word_embeddings=recipe.tie_word_embeddings,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(recipe.seed)
    return LlamaForCausalLM(config)


def train_lm(model, ids: torch.Tensor, recipe: TinyLlama, log_every: int = 100,
             progress: Progress | None = None) -> list[float]:
    """Seeded AdamW with cosine decay on random windows of `ids` (1-D). Returns the loss curve."""
    with bar_of(progress, recipe.train_steps, "training", "step") as bar:
        return _train_steps(model, ids, recipe, log_every, bar)


def _train_steps(model, ids: torch.Tensor, recipe: TinyLlama, log_every: int, bar) -> list[float]:
    gen = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, recipe.train_steps // 20)
    model.train()
    losses = []
    for step in range(recipe.train_steps):
        lr_scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / recipe.train_steps))
        for group in opt.param_groups:
            group["lr"] = recipe.lr * max(lr_scale, 0.05)
        starts = torch.randint(0, ids.numel() - recipe.seqlen, (recipe.batch_size,), generator=gen)
        batch = torch.stack([ids[s : s + recipe.seqlen] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.update(1)
        if log_every and (step + 1) % log_every == 0:
            log.info("train step %d/%d  loss %.3f", step + 1, recipe.train_steps, float(loss.detach()))
    model.eval()
    return losses


def build_trained_model(directory: str, recipe: TinyLlama, train_texts: list[str], heldout_texts: list[str],
                        progress: Progress | None = None) -> dict:
    """Train tokenizer and model on `train_texts`, save them (fp32 safetensors) plus
    texts/{train,heldout}.txt (documents joined by blank lines)."""
    start = time.perf_counter()
    tokenizer = train_tokenizer(train_texts, recipe.vocab_size)
    model = build_model(recipe, len(tokenizer))
    ids = tokenizer("\n\n".join(train_texts), return_tensors="pt", verbose=False).input_ids[0]
    losses = train_lm(model, ids, recipe, progress=progress)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    os.makedirs(os.path.join(directory, "texts"))
    for name, texts in (("train.txt", train_texts), ("heldout.txt", heldout_texts)):
        with open(os.path.join(directory, "texts", name), "w", encoding="utf-8") as f:
            f.write("\n\n".join(texts))
    info = {"recipe": asdict(recipe), "train_seconds": time.perf_counter() - start,
            "final_loss": sum(losses[-20:]) / min(20, len(losses)), "train_tokens": int(ids.numel())}
    with open(os.path.join(directory, "demo_training.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def cached_trained_model(
    recipe: TinyLlama, train_texts: list[str], heldout_texts: list[str], prefix: str, what: str,
    progress: Progress | None = None,
) -> str:
    """Directory of a model trained by `build_trained_model`, keyed by its recipe and texts: trained on
    first use, reused afterwards."""
    digest = hashlib.sha256(json.dumps(asdict(recipe), sort_keys=True).encode())
    for text in (*train_texts, "\0", *heldout_texts):
        digest.update(hashlib.sha256(text.encode()).digest())
    directory = os.path.join(cache_root(), f"{prefix}-{digest.hexdigest()[:12]}")
    done = os.path.join(directory, "demo_training.json")
    if os.path.isfile(done):
        log.info("using the cached model in %s", directory)
        return directory
    with out_lock(directory, wait=True):  # another process training the same model: wait, then reuse it
        if os.path.isfile(done):
            return directory
        print(f"Training {what}; cached in {directory}", flush=True)
        with staged_directory(directory) as staging:
            build_trained_model(staging, recipe, train_texts, heldout_texts, progress)
    return directory

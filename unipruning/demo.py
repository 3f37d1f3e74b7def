"""`unipruning demo`: the whole job on an embedded default, with no model and no network at hand.

A small Llama-architecture model is trained (seeded, 500 steps, with a progress bar and its ETA) on three
Shakespeare plays shipped inside the package, with a byte-level BPE tokenizer trained on the same text;
a fourth play is held out for perplexity. The trained model is cached (UNIPRUNING_CACHE, else
~/.cache/unipruning). Then it is pruned with the default settings at 50% unstructured, the 2:4 masks
are cut from the same saliency without calibrating again, and perplexities before and after are shown.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .io.identity import cache_root
from .io.staging import out_lock, staged_directory, writing
from .progress import Progress, bar_of

log = logging.getLogger("unipruning")

TRAIN_PLAYS = ("hamlet", "macbeth", "tempest")
HELDOUT_PLAYS = ("midsummer_nights_dream",)


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


def packaged_text(plays: tuple[str, ...]) -> list[str]:
    root = Path(__file__).parent / "_data"
    return [(root / f"{play}.txt").read_text(encoding="utf-8") for play in plays]


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        model_max_length=1 << 20,
    )


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


def cached_demo_model(recipe: TinyLlama = TinyLlama(), progress: Progress | None = None) -> str:
    """Directory of the trained demo model, training it on first use."""
    return cached_trained_model(recipe, packaged_text(TRAIN_PLAYS), packaged_text(HELDOUT_PLAYS), "demo-llama",
                                f"the demo model (seeded, {recipe.train_steps} steps, once)", progress)


def demo_paths(progress: Progress | None = None) -> dict[str, str]:
    """The demo model's directory and texts (training it first if needed), for the README's commands:
    {"DEMO_MODEL": ..., "DEMO_CALIB": its training text, "DEMO_HELDOUT": the held-out play}."""
    model_dir = cached_demo_model(progress=progress)
    texts = os.path.join(model_dir, "texts")
    return {"DEMO_MODEL": model_dir, "DEMO_CALIB": os.path.join(texts, "train.txt"),
            "DEMO_HELDOUT": os.path.join(texts, "heldout.txt")}


def run_demo(out: str | None = None, overwrite: bool = False, device: str = "auto",
             progress: Progress | None = None) -> dict:
    """Train (or reuse) the demo model, prune it at 50% and 2:4, print reports and perplexities."""
    from .config import Calibration, EvalOptions, MaskConfig, MaskSpec, PruneConfig, RunOptions
    from .evaluate import evaluate_checkpoint
    from .io.report import print_block_table, print_summary
    from .io.staging import preflight
    from .jobs import mask_checkpoint, prune_checkpoint

    recipe = TinyLlama()
    sources = {"UNIPRUNING_CACHE": cache_root()}  # the trained model is read from there
    if out is not None:
        preflight(out, overwrite, sources)
    model_dir = cached_demo_model(recipe, progress)
    texts = os.path.join(model_dir, "texts")
    heldout = os.path.join(texts, "heldout.txt")
    with tempfile.TemporaryDirectory(prefix="unipruning-demo-") as scratch:
        root = out if out is not None else scratch
        with writing(root, overwrite, sources) if out is not None else contextlib.nullcontext(root) as target:
            pruned50, pruned24 = os.path.join(target, "pruned-50"), os.path.join(target, "pruned-2of4")
            config = PruneConfig(mask=MaskSpec(sparsity=0.5), device=device)
            print("\n== unipruning prune --sparsity 0.5 (defaults: stochria, allocation layer) ==", flush=True)
            calibration = Calibration(os.path.join(texts, "train.txt"), nsamples=128, seqlen=recipe.seqlen)
            report50 = prune_checkpoint(model_dir, pruned50, config, calibration, RunOptions(progress=progress))
            print_block_table(report50)
            print_summary(report50)
            print("\n== unipruning mask --pattern 2:4 (same saliency, no calibration) ==", flush=True)
            report24 = mask_checkpoint(model_dir, os.path.join(pruned50, "saliency"), pruned24,
                                       MaskConfig(mask=MaskSpec(pattern="2:4")))
            print_summary(report24)
            rows = []
            for label, directory in (("dense", model_dir), ("50% unstructured", pruned50), ("2:4", pruned24)):
                result = evaluate_checkpoint(directory, heldout, recipe.seqlen, EvalOptions(device=device),
                                             progress=progress)
                rows.append((label, result["perplexity"]))
        print(f"\n== held-out perplexity ({', '.join(HELDOUT_PLAYS)}, seqlen {recipe.seqlen}) ==")
        for label, ppl in rows:
            print(f"  {label:<18} {ppl:8.2f}")
        if out is None:
            print("\n(outputs were temporary: pass --out DIR to keep the pruned checkpoints)")
        else:
            print(f"\npruned checkpoints: {os.path.join(out, 'pruned-50')}, {os.path.join(out, 'pruned-2of4')}")
        print(f"demo model: {model_dir} (for the README's commands: eval \"$(unipruning demo --paths)\")")
    return {"perplexity": dict(rows)}


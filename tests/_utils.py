"""Helpers for tests: tiny checkpoints made from configs (no hub), packaged text, GPU markers."""

from __future__ import annotations

import functools
import math
import os
import re

import pytest
import torch
from safetensors import safe_open

from unipruning.data import packaged_text

TEXT_PLAYS = ("macbeth", "tempest")


def requires_gpu(test):
    """Skip unless a CUDA device is visible (queried when the test runs, never at import)."""
    return pytest.mark.gpu(pytest.mark.skipif("not __import__('torch').cuda.is_available()",
                                              reason="needs a CUDA GPU")(test))


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


@functools.lru_cache(maxsize=1)
def tokenizer():
    return train_tokenizer(packaged_text(TEXT_PLAYS), vocab_size=512)


def make_text_file(directory) -> str:
    path = os.path.join(directory, "plays.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join(packaged_text(TEXT_PLAYS)))
    return path


def make_checkpoint(directory, dtype=torch.float32, tie=False, model_type="llama", layers=2,
                    hidden=32, intermediate=64, seed=0) -> str:
    """A random tiny causal LM of the Llama family saved with save_pretrained, plus its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    tok = tokenizer()
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=tie, bos_token_id=0, eos_token_id=1,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    GenerationConfig(bos_token_id=0, eos_token_id=1, max_new_tokens=8).save_pretrained(directory)
    with open(os.path.join(directory, "LICENSE"), "w") as f:
        f.write("test license\n")
    return str(directory)


def read_all(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory's safetensors files."""
    tensors = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118
                    tensors[key] = handle.get_tensor(key)
    return tensors


def prunable(config_or_dir) -> list[str]:
    from unipruning.io.checkpoint import load_config
    from unipruning.models import prunable_names

    config = load_config(config_or_dir) if isinstance(config_or_dir, str) else config_or_dir
    return prunable_names(config)


# tiny random configs of every supported family (independent of the engine's tables); sizes keep every
# prunable in_features a multiple of 4 and 8, so 2:4 and 4:8 apply everywhere
FAMILY_CONFIGS = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": 8},
    "gemma": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "sliding_window": 8, "query_pre_attn_scalar": 8},
    "gemma3_text": {"head_dim": 8, "sliding_window": 8, "query_pre_attn_scalar": 8, "sliding_window_pattern": 2,
                    "layer_types": ["sliding_attention", "full_attention"]},
    "phi3": {"pad_token_id": 0},
    "opt": {"ffn_dim": 64, "word_embed_proj_dim": 32, "enable_bias": True, "pad_token_id": 0},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 48},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 8},
}


def make_family_checkpoint(directory, model_type: str, layers: int = 2, seed: int = 0, **overrides) -> str:
    """A random tiny causal LM of `model_type` saved with save_pretrained (transformers' own on-disk
    layout, e.g. per-expert tensors for MoE), plus the shared test tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tokenizer()
    settings = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    if model_type == "opt":
        settings.pop("intermediate_size")
        settings.pop("num_key_value_heads")
    settings.update(FAMILY_CONFIGS[model_type])
    settings.update(overrides)
    config = AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # spread the weights so that scores are far from ties
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


def weight_files(directory) -> dict[str, bytes]:
    """{file name: bytes} of a checkpoint's weight shards and index: what must match byte for byte."""
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))
            if name.endswith(".safetensors") or name.endswith(".safetensors.index.json")}


def in_memory_job(windows, config, device, offload="auto"):
    """The job of a pass over a model held in memory (the blocks moved to `device` in their turn): nothing
    planned, the torch kernels, `config.batch_size` windows per step."""
    from unipruning.pipeline.job import Job

    return Job(checkpoint=None, plan={}, device=device, dtype=torch.float32, backend="torch", windows=windows,
               batch_size=config.batch_size, offload=offload)


def assert_within_twin_error(kernel: torch.Tensor, twin: torch.Tensor, exact: torch.Tensor, what: str = "") -> None:
    """flash-attention's rule for a kernel that is not bit-identical to its twin (another order of summation,
    another matmul): against `exact`, a float64 or exactly rounded reference of the same quantity, the kernel's
    largest error is at most twice the twin's own low-precision error, plus twice the rounding of `exact` to
    the compared dtype at its magnitude (flash-attention's atol, 2 * |(ref + 0.3) - 0.3 - ref|)."""
    assert kernel.shape == twin.shape == exact.shape and kernel.dtype == twin.dtype, what
    exact = exact.to(torch.float64).cpu()
    kernel_err = (kernel.to(torch.float64).cpu() - exact).abs().max().item()
    twin_err = (twin.to(torch.float64).cpu() - exact).abs().max().item()
    low = exact.to(kernel.dtype)
    rounding = (low + 0.3 - 0.3 - low).abs().max().item()
    assert kernel_err <= 2 * twin_err + 2 * rounding, (
        f"{what}: kernel error {kernel_err:.3g} > 2 x twin error {twin_err:.3g} + 2 x rounding {rounding:.3g}")


def exact_sums(values: torch.Tensor, dim: int) -> torch.Tensor:
    """The correctly rounded float64 sums of `values` along `dim` (math.fsum: no rounding but the last)."""
    rows = values.to(torch.float64).cpu().movedim(dim, -1).reshape(-1, values.shape[dim]).tolist()
    return torch.tensor([math.fsum(r) for r in rows], dtype=torch.float64).reshape(
        values.movedim(dim, -1).shape[:-1])


_PROGRESS_LINE = re.compile(r"^unipruning: (.+ \d+/\d+ \w+ \(\d+ s\)(, )?)+$")


def without_progress(err: str) -> str:
    """stderr without the plain progress lines a slow pass prints off a terminal every 30 s (a loaded machine
    makes any test's pass slow): what is left is what the command said."""
    return "".join(line for line in err.splitlines(keepends=True) if not _PROGRESS_LINE.match(line.rstrip("\n")))


def dies_after(monkeypatch, module, name: str, calls: int):
    """`module.name` patched to raise KeyboardInterrupt from its call number calls + 1 on (a run killed in the
    middle of a pass); returns the original, to put back for the resumed run."""
    original, seen = getattr(module, name), {"n": 0}

    def dying(*args, **kwargs):
        seen["n"] += 1
        if seen["n"] > calls:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, dying)
    return original

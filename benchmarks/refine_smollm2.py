"""Swap refinement of saliency masks on SmolLM2-135M (issue 24, part 2): the research behind
unipruning/algorithm/refine.py.

    python benchmarks/refine_smollm2.py --stage grid     # results in benchmarks/results/refine-research-smollm2-cpu.*

The model, calibration windows (16 x 512, seed 0, the Shakespeare plays minus the held-out three), the
calibration-domain check windows (16 x 512 at seed 1: quality_smollm2.py --preset-checks) and the
held-out texts (the three plays and pydoc) are quality_smollm2.py's, made by the same functions. The
model is held in memory: the stochria saliency is learnt once by `unipruning.prune` (what `unipruning
prune` computes) and cached in --work; masks are cut from it by `Saliency.masks`, refined here, applied
and evaluated in the same process.

Each linear's output error is ||((1 - M) * W) X||^2 = sum over rows of d G d^T with d the pruned entries
of the row and G = X^T X (tokens x in inputs). G comes from
- `dense`: the dense model's inputs (what the saliency's own forward sees);
- `pruned`: the pruned stream, block by block and within a block group by group (q/k/v, o, gate/up,
  down), from the block as refined so far (what the OBS pass does);
- `target`: the pruned stream, the objective ||W X - (M * W) X'||^2 with X the dense input and X' the
  pruned one (the mask also compensates for the error of the blocks before): needs X'^T X' and X^T X'.
The pair-selection rules are in refine_rules.py. Variants are chosen on the check windows only; the
held-out perplexities are reported for information.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import refine_rules as rules  # noqa: E402

MODEL = "/work/cache/smollm2-135m-instruct-f32"
MICRO = 4  # windows per forward


class Stop(Exception):
    pass


def setting_spec(setting: str, allocation: str):
    from unipruning import MaskSpec

    if ":" in setting:
        return MaskSpec(pattern=setting)
    return MaskSpec(sparsity=float(setting), allocation=allocation)


def kind_of(setting: str, allocation: str) -> str:
    return "nm" if ":" in setting else ("row" if allocation in ("row", "owl-row") else "layer")


# ------------------------------------------------------------------------------------------ setup
def prepare(args) -> dict:
    """Model, tokenizer, windows with their hashes, the saliency (learnt once, cached in --work)."""
    import texts
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unipruning import MaskSpec, PruneConfig, Saliency, prune
    from unipruning.data import calibration_windows, eval_windows, windows_hash

    tok = AutoTokenizer.from_pretrained(args.model)
    splits = {d: texts.write_split(d) for d in texts.DOMAINS}
    calib = calibration_windows(tok, splits["shakespeare"].calib, args.nsamples, args.seqlen, args.seed)
    check = calibration_windows(tok, splits["shakespeare"].calib, 16, args.seqlen, args.seed + 1)
    evals = {d: eval_windows(tok, splits[d].heldout, args.seqlen)[: args.eval_windows] for d in texts.DOMAINS}
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    sal_dir = os.path.join(args.work, f"saliency-{windows_hash(calib)[:16]}")
    seconds = None
    if not os.path.isfile(os.path.join(sal_dir, "saliency_config.json")):
        start = time.perf_counter()
        result = prune(model, calib, PruneConfig(mask=MaskSpec(sparsity=0.5)))
        seconds = time.perf_counter() - start
        result.saliency.save(sal_dir + ".tmp")
        os.replace(sal_dir + ".tmp", sal_dir)
    saliency = Saliency.load(sal_dir)
    windows = {"calib": calib, "calib-check": check, **evals}
    return {"model": model, "saliency": saliency, "windows": windows, "prune_seconds": seconds,
            "hashes": {k: {"sha256": windows_hash(v), "shape": list(v.shape)} for k, v in windows.items()},
            "dense": {n: p.detach().clone() for n, p in model.named_parameters()}}


def restore(ctx) -> None:
    with torch.no_grad():
        for n, p in ctx["model"].named_parameters():
            p.copy_(ctx["dense"][n])


def apply(ctx, masks: dict) -> None:
    from unipruning import apply_masks

    restore(ctx)
    apply_masks(ctx["model"], masks)


def perplexities(ctx, domains) -> dict:
    from unipruning import perplexity

    with torch.no_grad():
        return {d: perplexity(ctx["model"], ctx["windows"][d], torch.device("cpu"), 8) for d in domains}


# ------------------------------------------------------------------------------------------ streams
def layers(model):
    return model.model.layers


def groups_of(model) -> list[tuple[str, ...]]:
    from unipruning.models import family_for

    return [tuple(g) for g in family_for(model.config).sequential]


def capture(model, windows) -> list[tuple[torch.Tensor, dict]]:
    """(hidden states, keyword arguments) of block 0 for every micro-batch of windows."""
    out = []

    def hook(module, args, kwargs):
        out.append((args[0] if args else kwargs.pop("hidden_states"), {k: v for k, v in kwargs.items()
                                                                     if k != "past_key_values"}))
        raise Stop

    handle = layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in windows.split(MICRO):
                try:
                    model(input_ids=batch, use_cache=False)
                except Stop:
                    pass
    finally:
        handle.remove()
    return out


def run_block(block, stream, stop_at=None):
    """The block on every micro-batch; with stop_at (a linear), the inputs it receives instead (tokens, in)."""
    seen, outs = [], []

    def hook(module, args):
        seen.append(args[0].reshape(-1, args[0].shape[-1]))
        raise Stop

    handle = stop_at.register_forward_pre_hook(hook) if stop_at is not None else None
    try:
        with torch.no_grad():
            for hidden, kwargs in stream:
                try:
                    out = block(hidden, **kwargs)
                    outs.append((out[0] if isinstance(out, tuple) else out, kwargs))
                except Stop:
                    pass
    finally:
        if handle is not None:
            handle.remove()
    return torch.cat(seen) if stop_at is not None else outs


def gram(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """x^T y (in, in), float32 products accumulated per 2048 tokens in float64."""
    y = x if y is None else y
    total = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64)
    for s in range(0, x.shape[0], 2048):
        total += (x[s:s + 2048].T @ y[s:s + 2048]).double()
    return total.float()


def collect_dense_grams(ctx) -> tuple[list[list[torch.Tensor]], float, float]:
    """G of every group input of every block from the dense stream; and the seconds of the forward passes
    and of the Gram products (apart: a pipeline can take the Grams from the saliency's own forward)."""
    model = ctx["model"]
    groups = groups_of(model)
    restore(ctx)
    forward = products = 0.0
    start = time.perf_counter()
    stream = capture(model, ctx["windows"]["calib"])
    forward += time.perf_counter() - start
    out = []
    for block in layers(model):
        inputs = []
        for g in groups:
            start = time.perf_counter()
            x = run_block(block, stream, block.get_submodule(g[0]))
            mid = time.perf_counter()
            inputs.append(gram(x))
            forward, products = forward + mid - start, products + time.perf_counter() - mid
        out.append(inputs)
        start = time.perf_counter()
        stream = run_block(block, stream)
        forward += time.perf_counter() - start
    return out, forward, products


def dense_grams(ctx, args) -> list[list[torch.Tensor]]:
    """collect_dense_grams, cached in --work."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(args.work, f"grams-dense-{ctx['hashes']['calib']['sha256'][:16]}.safetensors")
    blocks, groups = len(layers(ctx["model"])), len(groups_of(ctx["model"]))
    if os.path.isfile(path):
        flat = load_file(path)
        return [[flat[f"{b}.{g}"] for g in range(groups)] for b in range(blocks)]
    out, _, _ = collect_dense_grams(ctx)
    save_file({f"{b}.{g}": t for b, row in enumerate(out) for g, t in enumerate(row)}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return out


# ------------------------------------------------------------------------------------------ refinement
def refine_matrix(w, keep, kind, nm, rule, iters, G, cross=None, transfers=True) -> tuple[torch.Tensor, dict]:
    """The research rules, or (rule `production`) unipruning.algorithm.refine.refine_mask itself."""
    start = time.perf_counter()
    if rule == "production":
        from unipruning.algorithm.refine import refine_mask

        if cross is not None:
            raise ValueError("the production function takes the plain objective (no cross Gram)")
        budget = {"row": "row", "layer": "matrix", "nm": f"{nm[0]}:{nm[1]}" if nm else None}[kind]
        out = refine_mask(w, G, keep, budget, iters, backend="torch")
        return out.keep, {"seconds": time.perf_counter() - start, "swaps": out.swaps, "moves": 0}
    if kind == "row":
        new, swaps = rules.refine_rows(w, G, keep, iters, rule, cross)
        moves = 0
    elif kind == "nm":
        new, swaps = rules.refine_nm(w, G, keep, nm[1], iters, cross)
        moves = 0
    else:
        new, swaps, moves = rules.refine_layer(w, G, keep, iters, rule, cross, transfers)
    return new, {"seconds": time.perf_counter() - start, "swaps": swaps, "moves": moves}


def _group_inputs(block, stream, groups) -> list[torch.Tensor]:
    return [run_block(block, stream, block.get_submodule(g[0])) for g in groups]


def refine_model(ctx, masks: dict, cfg: dict, grams: list | None) -> tuple[dict, dict, dict]:
    """Refined masks, per-matrix {before, after, energy, swaps, moves, seconds}, and timings. The model ends
    pruned with the refined masks."""
    from unipruning.algorithm.masks import masked

    model, groups, source = ctx["model"], groups_of(ctx["model"]), cfg["source"]
    kind, nm = kind_of(cfg["setting"], cfg["allocation"]), setting_spec(cfg["setting"], cfg["allocation"]).nm
    apply(ctx, masks)
    timing = {"refine": 0.0, "grams": 0.0, "forward": 0.0}
    start = time.perf_counter()
    pruned = capture(model, ctx["windows"]["calib"]) if source != "dense" else None
    dense = pruned if source == "target" else None
    timing["forward"] += time.perf_counter() - start
    refined, stats = {}, {}
    for b, block in enumerate(layers(model)):
        prefix = f"model.layers.{b}."
        names = [[f"{prefix}{m}.weight" for m in g] for g in groups]
        if dense is not None:  # the dense block's group inputs and outputs (its weights restored for this)
            t0 = time.perf_counter()
            with torch.no_grad():
                for n in sum(names, []):
                    model.get_parameter(n).copy_(ctx["dense"][n])
            xd = _group_inputs(block, dense, groups)
            dense = run_block(block, dense)
            with torch.no_grad():
                for n in sum(names, []):
                    model.get_parameter(n).copy_(masked(ctx["dense"][n], masks[n]))
            timing["forward"] += time.perf_counter() - t0
        for g, members in enumerate(names):
            t0 = time.perf_counter()
            cross = dense_gram = None
            if source == "dense":
                G = grams[b][g]
            else:
                xp = run_block(block, pruned, block.get_submodule(groups[g][0]))
                t1 = time.perf_counter()
                timing["forward"] += t1 - t0
                G = gram(xp)
                if source == "target":
                    cross, dense_gram = gram(xd[g], xp), gram(xd[g])
                timing["grams"] += time.perf_counter() - t1
            for n in members:
                w, keep = ctx["dense"][n], masks[n]
                new, info = refine_matrix(w, keep, kind, nm, cfg["rule"], cfg["iters"], G, cross,
                                          cfg.get("transfers", True))
                timing["refine"] += info["seconds"]
                energy = rules.error(w, torch.zeros_like(keep), G, cross, dense_gram) if cross is None else \
                    float(((w.double() @ dense_gram.double()) * w.double()).sum())
                stats[n] = {"before": rules.error(w, keep, G, cross, dense_gram),
                            "after": rules.error(w, new, G, cross, dense_gram), "energy": energy, **info}
                refined[n] = new
                with torch.no_grad():
                    model.get_parameter(n).copy_(masked(w, new))
        if pruned is not None:
            t0 = time.perf_counter()
            pruned = run_block(block, pruned)
            timing["forward"] += time.perf_counter() - t0
    return refined, stats, timing


# ------------------------------------------------------------------------------------------ runs
TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def summarize(stats: dict) -> dict:
    """Error of the refined masks relative to the unrefined ones: overall (sums), mean ratio per matrix,
    per matrix type; and the unrefined error relative to the output energy."""
    def ratio(items):
        return sum(s["after"] for s in items) / max(sum(s["before"] for s in items), 1e-300)

    vals = list(stats.values())
    out = {"after_over_before": ratio(vals),
           "mean_matrix_ratio": sum(s["after"] / max(s["before"], 1e-300) for s in vals) / len(vals),
           "before_over_energy": sum(s["before"] / s["energy"] for s in vals) / len(vals),
           "swaps": sum(s["swaps"] for s in vals), "moves": sum(s["moves"] for s in vals)}
    out["by_type"] = {t: ratio([s for n, s in stats.items() if f".{t}." in n]) for t in TYPES}
    return out


def config_key(cfg: dict) -> str:
    return "-".join(f"{k}={cfg[k]}" for k in sorted(cfg)).replace(":", "of").replace("/", "_")


def run_config(ctx, cfg: dict, grams, domains, args) -> dict:
    """One configuration (cached in --work/runs): its masks refined, its errors and perplexities."""
    path = os.path.join(args.work, "runs", config_key(cfg) + f"-{'+'.join(domains)}.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    masks = ctx["saliency"].masks(ctx["dense_view"], setting_spec(cfg["setting"], cfg["allocation"]))
    record = {**cfg, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join([sys.executable, *sys.argv])}
    if cfg["rule"] == "none":
        apply(ctx, masks)
    else:
        _, stats, timing = refine_model(ctx, masks, cfg, grams)
        record.update(timing=timing, errors=summarize(stats), matrices=stats)
    if domains:
        start = time.perf_counter()
        record["perplexity"] = perplexities(ctx, domains)
        record["eval_seconds"] = time.perf_counter() - start
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)
    short = {k: v for k, v in record.items() if k not in ("matrices", "date")}
    print(json.dumps(short), flush=True)
    return record


def time_round(ctx, setting: str, allocation: str, iters: int) -> dict:
    """One round, side by side in this process: the mask-only prune in memory (`unipruning.prune`: the
    saliency and the masks, what `unipruning prune` computes without the files), the dense Grams, and the
    refinement of every mask by the production function (torch backend)."""
    from unipruning import PruneConfig, prune
    from unipruning.algorithm.refine import refine_mask

    spec, kind = setting_spec(setting, allocation), kind_of(setting, allocation)
    budget = {"row": "row", "layer": "matrix", "nm": setting}[kind]
    restore(ctx)
    start = time.perf_counter()
    masks = prune(ctx["model"], ctx["windows"]["calib"], PruneConfig(mask=spec)).masks
    prune_s = time.perf_counter() - start
    grams, forward_s, products_s = collect_dense_grams(ctx)
    start = time.perf_counter()
    swaps = 0
    for b in range(len(layers(ctx["model"]))):
        for g, members in enumerate(groups_of(ctx["model"])):
            for m in members:
                name = f"model.layers.{b}.{m}.weight"
                swaps += refine_mask(ctx["dense"][name], grams[b][g], masks[name], budget, iters).swaps
    return {"setting": setting, "allocation": allocation, "iters": iters, "prune_seconds": prune_s,
            "gram_forward_seconds": forward_s, "gram_product_seconds": products_s,
            "refine_seconds": time.perf_counter() - start, "swaps": swaps}


# llm-compressor 0.14's Wanda on the same windows (benchmarks/results/quality-smollm2-cpu.json), for the targets
LLMC_WANDA = {"0.5": {"shakespeare": 77.49, "pydoc": 33.39}, "0.7": {"shakespeare": 444.61, "pydoc": 849.15},
              "2:4": {"shakespeare": 160.03, "pydoc": 104.80}}


def variant(r: dict) -> str:
    return "mask only" if r["rule"] == "none" else f"{r['source']} G, {r['rule']}, iters {r['iters']}"


def ppl_table(records: list[dict], domain: str) -> list[str]:
    cells: dict[tuple, dict] = {}
    for r in records:
        if domain in r.get("perplexity", {}):
            cells.setdefault((r["setting"], r["allocation"]), {})[variant(r)] = r["perplexity"][domain]
    names = sorted({v for c in cells.values() for v in c}, key=lambda v: (v != "mask only", v))
    lines = [f"| setting, allocation ({domain}) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for (setting, alloc), c in sorted(cells.items()):
        lines.append(f"| {setting} {alloc} | " + " | ".join(f"{c[n]:.2f}" if n in c else "" for n in names) + " |")
    return lines


def error_table(records: list[dict]) -> list[str]:
    lines = ["| setting, allocation, variant | all | mean per matrix | " + " | ".join(TYPES) + " | swaps | s |",
             "|---" * (len(TYPES) + 5) + "|"]
    for r in records:
        if "errors" in r:
            e = r["errors"]
            lines.append(f"| {r['setting']} {r['allocation']}, {variant(r)} | {e['after_over_before']:.3f} | "
                         f"{e['mean_matrix_ratio']:.3f} | " + " | ".join(f"{e['by_type'][t]:.3f}" for t in TYPES)
                         + f" | {e['swaps']} | {r['timing']['refine']:.0f} |")
    return lines


def time_table(times: list[dict]) -> list[str]:
    lines = ["| setting, allocation, iters | prune s | Gram products s | Gram forward s | refine s | refine / prune |"
             " (Grams + refine) / prune |", "|---|---|---|---|---|---|---|"]
    for t in times:
        lines.append(f"| {t['setting']} {t['allocation']}, {t['iters']} | {t['prune_seconds']:.0f} | "
                     f"{t['gram_product_seconds']:.0f} | {t['gram_forward_seconds']:.0f} | {t['refine_seconds']:.0f} | "
                     f"{t['refine_seconds'] / t['prune_seconds']:.2f} | "
                     f"{(t['refine_seconds'] + t['gram_product_seconds']) / t['prune_seconds']:.2f} |")
    return lines


def report(ctx, args) -> None:
    """benchmarks/results/refine-research-smollm2-cpu.{json,md} from every run in --work."""
    import bench_peers as bp

    runs = os.path.join(args.work, "runs")
    records = []
    for name in sorted(os.listdir(runs)):
        with open(os.path.join(runs, name)) as f:
            records.append(json.load(f))
    times = []
    if os.path.isfile(os.path.join(args.work, "times.jsonl")):
        with open(os.path.join(args.work, "times.jsonl")) as f:
            times = [json.loads(line) for line in f if line.strip()]
    out = args.out or os.path.join(ROOT, "benchmarks", "results", "refine-research-smollm2-cpu.json")
    result = {"device": bp.device_name()[1], "date": datetime.date.today().isoformat(), "versions": bp.versions(),
              "windows": ctx["hashes"], "prune_seconds_of_cached_saliency": ctx["prune_seconds"],
              "llmc_wanda": LLMC_WANDA, "results": records, "times": times}
    bp.write_json(out, result)
    md = [f"SmolLM2-135M-Instruct (float32), stochria saliency, {args.nsamples} x {args.seqlen} calibration windows, "
          f"{result['device']}, {result['date']}. Commands: see the json (`command` of each record).", ""]
    md += ["Perplexity on the calibration-domain check windows (what the variants are chosen on):", ""]
    md += ppl_table(records, "calib-check")
    for domain in ("shakespeare", "pydoc"):
        md += ["", f"Held-out perplexity ({domain}; for information, never used to choose):", ""]
        md += ppl_table(records, domain)
    md += ["", "Output error of the refined masks over the unrefined ones (the objective; all: sums over the "
           "matrices):", ""] + error_table(records)
    if times:
        md += ["", "Time, side by side in one process (one thread):", ""] + time_table(times)
    with open(out[:-5] + ".md", "w") as f:
        f.write("\n".join(md) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=["explore", "grid", "time", "report"], required=True)
    p.add_argument("--model", default=MODEL)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "refine-smollm2"))
    p.add_argument("--configs", help="JSON list of configurations (explore)")
    p.add_argument("--domains", nargs="*", default=["calib-check"])
    p.add_argument("--out", help="default: benchmarks/results/refine-research-smollm2-cpu.json")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)  # one thread per process: on a shared machine OpenMP threads wait on each other
    os.makedirs(args.work, exist_ok=True)
    ctx = prepare(args)
    ctx["dense_view"] = {n: t for n, t in ctx["dense"].items() if n.endswith("proj.weight")}
    grams = dense_grams(ctx, args)
    if args.stage == "report":
        report(ctx, args)
    if args.stage == "explore":
        for cfg in json.loads(args.configs):
            run_config(ctx, cfg, grams, args.domains, args)
    if args.stage == "time":
        for cfg in json.loads(args.configs):
            record = time_round(ctx, cfg["setting"], cfg["allocation"], cfg["iters"])
            record["date"] = datetime.datetime.now().isoformat(timespec="seconds")
            print(json.dumps(record), flush=True)
            with open(os.path.join(args.work, "times.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()

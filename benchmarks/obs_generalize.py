"""Why the OBS update loses off the calibration domain, per layer, and which correction keeps its gain.

    OMP_NUM_THREADS=1 python benchmarks/obs_generalize.py layers    # the per-layer experiment
    OMP_NUM_THREADS=1 python benchmarks/obs_generalize.py models    # whole-model check, then held-out

The protocol is benchmarks/quality_smollm2.py's (SmolLM2-135M float32, 16 x 512 calibration windows of the
Shakespeare plays minus three held-out ones, seed 0; its --work directory layout and its per-run records).
Two texts choose, never the held-out ones:
- calib-check: 16 x 512 windows of the calibration plays at seed 1 (quality_smollm2's check windows);
- licenses: a domain that is neither Shakespeare nor Python's documentation: the licence texts Debian ships
  in /usr/share/common-licenses (modern legal English; one file per licence family, LICENSES), the first
  16 x 512 non-overlapping windows. Offline on every Debian/Ubuntu machine, and unlike the calibration
  plays in vocabulary, register and century, as the held-out pydoc text is.

`layers`: on the dense stream, every 3rd decoder block, for each group's input the Gram matrix G = X^T X / n
of the calibration windows and of both check texts; per linear the Hessian's effective rank, how much of its
diagonal the dampening is, the OBS update's size relative to W, and the output error tr(dW G dW^T) /
tr(W G W^T) on each text of: the saliency's mask alone (per row, as --preset fast), the Γ-guided OBS sweep
(as --preset quality) and its corrections. `models`: the corrections through `unipruning mask` (the whole
pipeline), chosen on the two check texts; then the held-out texts for the choice and the baselines only.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_peers as bp  # noqa: E402
import quality_smollm2 as qs  # noqa: E402

LICENSE_DIR = "/usr/share/common-licenses"
# one text per licence family (the later versions; GPL-2/LGPL-2 and GFDL-1.2 repeat most of their successors)
LICENSES = ("Apache-2.0", "Artistic", "BSD", "CC0-1.0", "GFDL-1.3", "GPL-3", "LGPL-2.1", "MPL-2.0")
CHECK_WINDOWS = 16
DIAG_DAMPS = (0.0, 0.3, 1.0)  # models: the candidates of --diag-damp under --preset quality
LAYER_BLOCKS = range(0, 30, 3)
GROUPS = {"self_attn.q_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "self_attn.o_proj": ("self_attn.o_proj",), "mlp.gate_proj": ("mlp.gate_proj", "mlp.up_proj"),
          "mlp.down_proj": ("mlp.down_proj",)}


def parse_args(argv=None) -> argparse.Namespace:
    p = bp._Parser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=("layers", "models"))
    p.add_argument("--settings", nargs="+", default=["0.5", "0.7", "2:4"])
    p.add_argument("--work", help="default: $UNIPRUNING_CACHE/bench-obs-generalize")
    p.add_argument("--out", help="default: benchmarks/results/obs-generalize-<mode>-<device>.json")
    p.add_argument("--diag-damps", nargs="+", type=float, default=list(DIAG_DAMPS),
                   help="models: the --diag-damp candidates of --preset quality (default 0 0.3 1)")
    args = p.parse_args(argv)
    base = os.environ.get("UNIPRUNING_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "unipruning")
    qargs = qs.parse_args(["--settings", *args.settings, "--work", args.work or
                           os.path.join(base, "bench-obs-generalize")])
    return argparse.Namespace(**{**vars(qargs), "mode": args.mode, "out": args.out, "diag_damps": args.diag_damps})


def license_texts(work: str) -> tuple[str, dict]:
    """The licence files as a directory of .txt documents (what eval_windows reads) and their sha256s."""
    manifest = {}
    for name in LICENSES:
        with open(os.path.join(LICENSE_DIR, name), "rb") as f:
            manifest[name] = hashlib.sha256(f.read()).hexdigest()
    out = os.path.join(work, "licenses-" + hashlib.sha256(json.dumps(manifest).encode()).hexdigest()[:12])
    if not os.path.isdir(out):
        stage = f"{out}.partial-{os.getpid()}"
        os.makedirs(stage)
        for name in LICENSES:
            shutil.copyfile(os.path.join(LICENSE_DIR, name), os.path.join(stage, name + ".txt"))
        os.replace(stage, out)
    return out, manifest


def context(args) -> dict:
    """quality_smollm2's model, windows and held-out sets, plus the two check texts (ctx['check'])."""
    from transformers import AutoTokenizer

    from unipruning.data import eval_windows, windows_hash

    os.makedirs(args.work, exist_ok=True)
    ctx = bp.prepare(args)
    ctx["check"] = qs.check_windows(ctx, args)
    text, manifest = license_texts(args.work)
    ids = eval_windows(AutoTokenizer.from_pretrained(ctx["model"]), text, args.eval_seqlen)[:CHECK_WINDOWS]
    path = os.path.join(args.work, f"licenses-{windows_hash(ids)[:16]}.pt")
    bp.save_windows(ids, path)
    ctx["check"]["licenses"] = {"path": path, "sha256": windows_hash(ids), "windows": int(ids.shape[0]),
                                "seqlen": int(ids.shape[1]), "text": LICENSE_DIR, "files": manifest}
    return ctx


def saliency(args, ctx) -> str:
    """The stochria saliency directory of quality_smollm2's calibrate-stochria run (made if absent)."""
    job = next(j for j in qs.jobs(args, ctx, None) if j["name"] == "calibrate-stochria")
    qs.run(job, args, ctx)
    return os.path.join(qs.saliency_dir(args, "stochria"), "saliency")


# ---------------------------------------------------------------------------------------------- layers
def gram_matrices(model, windows, blocks) -> dict:
    """{block.group: X^T X / n (float64)} of each group's input over `windows`, on the dense stream."""
    import torch

    grams, counts, handles = {}, {}, []

    def hook(key):
        def collect(module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            grams[key] = grams.get(key, 0) + x.T @ x
            counts[key] = counts.get(key, 0) + x.shape[0]
        return collect

    for b in blocks:
        layer = model.model.layers[b]
        handles += [layer.get_submodule(g).register_forward_pre_hook(hook(f"{b}.{g}")) for g in GROUPS]
    with torch.no_grad():
        for w in windows.split(4):
            model(input_ids=w, use_cache=False)
    for h in handles:
        h.remove()
    return {k: g / counts[k] for k, g in grams.items()}


def hessian_facts(g) -> dict:
    """Effective rank (participation ratio and entropy rank) of G, and how the default dampening compares
    with its diagonal."""
    import torch

    ev = torch.linalg.eigvalsh(g).clamp_min(0)
    p = ev / ev.sum()
    diag = g.diagonal()
    damp = 0.01 * float(diag.mean())
    return {"in": g.shape[0], "participation_rank": float(ev.sum() ** 2 / (ev ** 2).sum()),
            "entropy_rank": float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())),
            "cond_damped": float((ev.max() + damp) / (ev.min() + damp)),
            "share_diag_below_damp": float((diag < damp).double().mean()),
            "diag_max_over_median": float(diag.max() / diag.median())}


def output_error(dw, g) -> float:
    """tr(dW G dW^T): the mean squared output error of the weight change dW on inputs of Gram G."""
    return float(((dw @ g) * dw).sum())


def variants(w, g, z, spec, obs):
    """{name: (W', keep)} of one matrix: the mask-only and OBS settings the experiment compares."""
    import torch

    from unipruning.algorithm.masks import matrix_mask
    from unipruning.config import MaskSpec

    h = (2 * g).to(torch.float32)
    per_row = spec if spec.nm else MaskSpec(spec.sparsity, allocation="row")
    spec = spec if spec.nm else MaskSpec(spec.sparsity, allocation="layer")  # the sweep's count per matrix
    fixed = matrix_mask(z, w, per_row)
    prior = obs.guide_prior(z, w, 1.0, "torch")
    guided = obs.sweep_rule(spec, w.numel(), None, prior)
    out = {"mask-only (fast)": (torch.where(fixed, w, 0.0), fixed),
           "obs fixed mask": obs.reconstruct_weight(w, h, obs.sweep_rule(spec, w.numel(), fixed), "m", None, "torch")}
    for damp in (0.01, 0.1, 1.0):
        out[f"guided damp {damp:g}"] = obs.reconstruct_weight(w, h, guided, "m", obs.ObsSettings(damp=damp), "torch")
    updated, keep = out["guided damp 0.01"]
    out["guided mask, no update"] = (torch.where(keep, w, 0.0), keep)
    for frac in (0.5,):
        out[f"guided update x{frac:g}"] = (torch.where(keep, w + frac * (updated - w), 0.0), keep)
    for rel in (0.1, 0.3, 1.0):
        settings = obs.ObsSettings(diag_damp=rel)
        out[f"guided diag-damp {rel:g}"] = obs.reconstruct_weight(w, h, guided, "m", settings, "torch")
    return out


def layer_records(model, saliency_dir, grams, blocks, settings) -> list[dict]:
    import torch

    from unipruning.algorithm import obs
    from unipruning.config import MaskSpec
    from unipruning.io.saliency import Saliency

    sal = Saliency.load(saliency_dir)
    records = []
    for b in blocks:
        layer = model.model.layers[b]
        for group, members in GROUPS.items():
            g = {d: grams[d][f"{b}.{group}"] for d in grams}
            facts = hessian_facts(g["calib"])
            facts["calib_vs_check"] = float((g["calib"] - g["calib-check"]).norm() / g["calib-check"].norm())
            facts["calib_vs_licenses"] = float((g["calib"] - g["licenses"]).norm() / g["licenses"].norm())
            for m in members:
                name = f"model.layers.{b}.{m}.weight"
                w = layer.get_submodule(m).weight.detach().to(torch.float32)
                base = {d: output_error(w.double(), gd) for d, gd in g.items()}
                for s in settings:
                    spec = MaskSpec(pattern=s) if ":" in s else MaskSpec(float(s))
                    for vname, (w2, _) in variants(w, g["calib"], sal.z[name], spec, obs).items():
                        dw = (w - w2).double()
                        upd = torch.where(w2 != 0, w2 - w, 0.0)
                        records.append({"matrix": name, "setting": s, "variant": vname, **facts,
                                        "update_rel": float(upd.norm() / w.norm()),
                                        "error": {d: output_error(dw, gd) / base[d] for d, gd in g.items()}})
        print(f"block {b} done", flush=True)
    return records


DOMAINS = ("calib", "calib-check", "licenses")
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BY_KIND = ("obs fixed mask", "guided damp 0.01", "guided diag-damp 0.3", "guided diag-damp 1")


def relative_errors(rows: list[dict], variant: str) -> list[float]:
    """Geometric mean over `rows`' matrices of `variant`'s error relative to the fast mask's, per text."""
    base = {r["matrix"]: r["error"] for r in rows if r["variant"] == "mask-only (fast)"}
    mine = [r for r in rows if r["variant"] == variant]
    return [math.exp(sum(math.log(r["error"][d] / base[r["matrix"]][d]) for r in mine) / len(mine)) for d in DOMAINS]


def summarise_layers(records: list[dict], settings: list[str]) -> str:
    lines = []
    for s in settings:
        rows = [r for r in records if r["setting"] == s]
        lines += ["", f"setting {s}: output error relative to the fast mask's (geometric mean over matrices)", "",
                  "| variant | " + " | ".join(DOMAINS) + " | update / W |", "|---" * (len(DOMAINS) + 2) + "|"]
        for v in dict.fromkeys(r["variant"] for r in rows):
            upd = [r["update_rel"] for r in rows if r["variant"] == v]
            lines.append(f"| {v} | " + " | ".join(f"{c:.3f}" for c in relative_errors(rows, v))
                         + f" | {sum(upd) / len(upd):.3f} |")
        lines += ["", f"setting {s}, per kind of matrix (calib / calib-check / licenses):", "",
                  "| matrix | " + " | ".join(BY_KIND) + " |", "|---" * (len(BY_KIND) + 1) + "|"]
        for kind in KINDS:
            mine = [r for r in rows if r["matrix"].endswith(f"{kind}.weight")]
            lines.append(f"| {kind} | " + " | ".join(" / ".join(f"{c:.2f}" for c in relative_errors(mine, v))
                                                     for v in BY_KIND) + " |")
    return "\n".join(lines)


def hessian_table(records: list[dict]) -> str:
    """One row per group input (the facts are those of its first matrix's records)."""
    heads = {ms[0] + ".weight" for ms in GROUPS.values()}
    seen, lines = set(), ["| group input | in | participation rank | entropy rank | diag share < damp | "
                          "max/median diag | rel. diff calib-check | rel. diff licenses |", "|---" * 8 + "|"]
    for r in records:
        key = r["matrix"].removesuffix(".weight")
        if key in seen or not any(r["matrix"].endswith(h) for h in heads):
            continue
        seen.add(key)
        lines.append(f"| {key} | {r['in']} | {r['participation_rank']:.1f} | {r['entropy_rank']:.1f} | "
                     f"{r['share_diag_below_damp']:.2f} | {r['diag_max_over_median']:.0f} | "
                     f"{r['calib_vs_check']:.3f} | {r['calib_vs_licenses']:.3f} |")
    return "\n".join(lines)


def write_layers_md(path: str, summary: str, records: list[dict], settings: list[str]) -> None:
    with open(path, "w") as f:
        f.write(f"{summary}\n\nThe Hessians (calibration windows), per group input:\n\n"
                f"{hessian_table(records)}\n{summarise_layers(records, settings)}\n")


def run_layers(args, ctx) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    sal = saliency(args, ctx)
    model = AutoModelForCausalLM.from_pretrained(ctx["model"], dtype=torch.float32).eval()
    texts = {"calib": ctx["windows"]["path"], **{d: e["path"] for d, e in ctx["check"].items()}}
    grams = {d: gram_matrices(model, torch.load(p), LAYER_BLOCKS) for d, p in texts.items()}
    records = layer_records(model, sal, grams, LAYER_BLOCKS, args.settings)
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"obs-generalize-layers-{bp.device_name()[0]}.json")
    head = header(args, ctx, "layers")
    bp.write_json(out, {**head, "blocks": list(LAYER_BLOCKS), "records": records})
    write_layers_md(out[:-5] + ".md", head["summary"], records, args.settings)
    print(f"results: {out}")


def header(args, ctx, mode: str) -> dict:
    device = bp.device_name()[1]
    date = datetime.date.today().isoformat()
    command = " ".join(["OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", ""), "python",
                        os.path.relpath(os.path.abspath(sys.argv[0]), ROOT), *sys.argv[1:]])
    return {"summary": f"SmolLM2-135M-Instruct (float32), {args.nsamples} x {args.seqlen} calibration windows, "
                       f"{device}, {date}; command: `{command}`.",
            "device": device, "date": date, "command": command, "versions": bp.versions(),
            "unipruning_git": qs.git_hash(), "model": {"path": ctx["model"], "sha256": ctx["model_sha256"]},
            "calibration": ctx["windows"], "check": ctx["check"], "mode": mode}


# ---------------------------------------------------------------------------------------------- models
def model_jobs(args, ctx, sal: str) -> list[dict]:
    """Per setting: --preset fast (owl-row mask; N:M per group) and --preset quality (owl counts, Γ-guided
    OBS) with each --diag-damp; checkpoints kept for the held-out evaluation of the choice."""
    obs = ["--reconstruct", "obs", *qs.window_options(args, ctx), "--batch-size", str(args.nsamples),
           "--guide-alpha", "1"]
    todo = []
    for s in args.settings:
        mask = ["-m", "unipruning", "mask", "--model", ctx["model"], "--out", "{out}", "--saliency", sal,
                *qs.setting_options(s)]
        todo.append({"name": "fast", "setting": s, "check": True, "keep": True,
                     "cmd": mask + ([] if ":" in s else ["--allocation", "owl-row"])})
        for d in args.diag_damps:
            todo.append({"name": f"quality-diag-damp-{d:g}", "setting": s, "check": True, "keep": True,
                         "cmd": mask + ([] if ":" in s else ["--allocation", "owl"]) + obs
                         + (["--diag-damp", f"{d:g}"] if d else [])})
    return todo


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def choose(records: list[dict]) -> str:
    """The --diag-damp candidate of the lowest geometric mean perplexity over every setting and both check
    texts (the rule fixed before any held-out text was evaluated)."""
    candidates = sorted({r["method"] for r in records if r["method"].startswith("quality-")})
    return min(candidates, key=lambda m: geomean(r["perplexity"][d] for r in records if r["method"] == m
                                                 for d in r["perplexity"]))


EARLIER_WINDOWS = 8  # the held-out windows per text of benchmarks/results/quality-smollm2-cpu.json


def earlier_evals(ctx) -> dict:
    """The first EARLIER_WINDOWS held-out windows of each text ("<text>@8"): the sets the earlier table (and
    its llm-compressor numbers) was measured on, saved as their own files."""
    import torch

    from unipruning.data import windows_hash

    out = {}
    for domain, e in ctx["eval"].items():
        ids = torch.load(e["path"])[:EARLIER_WINDOWS]
        path = f"{e['path'][:-3]}-first{EARLIER_WINDOWS}.pt"
        bp.save_windows(ids, path)
        out[f"{domain}@{EARLIER_WINDOWS}"] = {**e, "path": path, "sha256": windows_hash(ids), "windows": len(ids)}
    return out


def heldout(record: dict, args, ctx) -> dict:
    """The held-out perplexity of a kept checkpoint on the first 8 windows of each held-out text (the earlier
    table's sets; 32 windows per text cost hours per run on a shared 2-core machine), cached in --work/runs."""
    tag = os.path.basename(record["log"])[:-4]
    path = os.path.join(args.work, "runs", f"heldout-{tag}.json")
    evals = earlier_evals(ctx)
    if os.path.isfile(path):
        with open(path) as f:
            done = json.load(f)
        if set(done["perplexity"]) == set(evals):
            return done
    bp.write_json(path, {**record, "perplexity": bp.evaluate(os.path.join(args.work, "ckpt", tag), evals),
                         "check_perplexity": record["perplexity"]})
    with open(path) as f:
        return json.load(f)


def settings_table(records: list[dict], settings: list[str], domain: str) -> str:
    return qs.table([r for r in records if domain in r["perplexity"]], settings, domain)


def run_models(args, ctx) -> None:
    sal = saliency(args, ctx)
    checked = [qs.run(job, args, ctx) for job in model_jobs(args, ctx, sal)]
    chosen = choose(checked)
    print(f"chosen on the check texts: {chosen}", flush=True)
    held = [heldout(r, args, ctx) for r in checked if r["method"] in ("fast", "quality-diag-damp-0", chosen)]
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"obs-generalize-models-{bp.device_name()[0]}.json")
    head = header(args, ctx, "models")
    bp.write_json(out, {**head, "eval": ctx["eval"], "chosen": chosen, "check_records": checked,
                        "heldout_records": held})
    md = [head["summary"], "", "Chosen on the check texts (lowest geometric mean over settings and both texts): "
          f"{chosen}.", ""]
    for domain in ctx["check"]:
        md += [f"Check text {domain}:", "", settings_table(checked, args.settings, domain), ""]
    for domain in held[0]["perplexity"]:
        md += [f"Held-out {domain} (evaluated after the choice):", "", settings_table(held, args.settings, domain), ""]
    for s in args.settings:
        md += [qs.cost_table(checked, s), ""]
    with open(out[:-5] + ".md", "w") as f:
        f.write("\n".join(md))
    print(f"results: {out}")


def main(argv=None) -> None:
    args = parse_args(argv)
    ctx = context(args)
    (run_layers if args.mode == "layers" else run_models)(args, ctx)


if __name__ == "__main__":
    main()

"""The closed-form saliency against the exact recursion on a real model: mask agreement per setting.

    unipruning prune --model M --out A --calib T --nsamples 16 --seqlen 512                  # closed form (auto)
    unipruning prune --model M --out B --calib T --nsamples 16 --seqlen 512 --saliency-update exact
    python benchmarks/closed_form_agreement.py --model M --closed A/saliency --exact B/saliency \
        --out benchmarks/results/closed-form-smollm2-cpu.json

For 1%, 10%, 50%, 70% at allocations layer, row and global, and 2:4: the fraction of all prunable entries
whose keep bit is the same under both saliencies (masks cut as `mask` cuts them, with the model's |W| as
the tie-break), and the largest relative difference of z; the prune reports' wall times beside them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform

import torch
from safetensors import safe_open

from unipruning.algorithm.masks import compute_masks
from unipruning.config import MaskSpec
from unipruning.io.saliency import Saliency

SETTINGS = [(s, "unstructured", a) for s in (0.01, 0.1, 0.5, 0.7) for a in ("layer", "row", "global")]
SETTINGS.append((None, "2:4", "layer"))


def weights(model_dir: str, names: list[str]) -> dict[str, torch.Tensor]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            where = json.load(f)["weight_map"]
    else:
        where = dict.fromkeys(names, "model.safetensors")
    out = {}
    for name in names:
        with safe_open(os.path.join(model_dir, where[name]), "pt") as f:
            out[name] = f.get_tensor(name).float()
    return out


def agreement(closed: Saliency, exact: Saliency, w: dict[str, torch.Tensor], spec: MaskSpec) -> float:
    a, b = compute_masks(closed.z, w, spec), compute_masks(exact.z, w, spec)
    same = sum(int((a[n] == b[n]).sum()) for n in a)
    return same / sum(m.numel() for m in a.values())


def z_difference(closed: Saliency, exact: Saliency) -> float:
    worst = 0.0
    for name in closed.z:
        za, zb = closed.z[name], exact.z[name]
        worst = max(worst, float(((za - zb).abs() / zb.abs().clamp_min(1e-12)).max()))
    return worst


def wall(saliency_dir: str) -> float | None:
    path = os.path.join(os.path.dirname(os.path.abspath(saliency_dir)), "pruning_report.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("wall_seconds")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--closed", required=True, help="saliency directory computed with --saliency-update auto")
    p.add_argument("--exact", required=True, help="saliency directory computed with --saliency-update exact")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    closed, exact = Saliency.load(args.closed), Saliency.load(args.exact)
    w = weights(args.model, list(closed.z))
    rows = []
    for sparsity, pattern, allocation in SETTINGS:
        spec = MaskSpec(sparsity=sparsity, pattern=pattern, allocation=allocation)
        rows.append({"sparsity": sparsity, "pattern": pattern, "allocation": allocation,
                     "agreement": agreement(closed, exact, w, spec)})
        print(rows[-1], flush=True)
    result = {"device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "entries": sum(t.numel() for t in w.values()), "max_relative_z_difference": z_difference(closed, exact),
              "thresholds_equal": closed.t == exact.t,
              "prune_wall_seconds": {"closed_form": wall(args.closed), "exact": wall(args.exact)}, "settings": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

"""What calibration costs beside the forward passes, on the CPU, side by side in one run.

For the matrices of one decoder block of SmolLM2-135M (q/o 576x576, k/v 192x576, gate/up 1536x576, down
576x1536; random weights, random per-step activation statistics) and T steps, the saliency's cost with
the exact recursion (T passes: step vectors, update, exact threshold) against the closed form (per-step
vectors, one product per matrix, the exact recursion on the candidates only), with their mask
agreement; and the stochria subset sums alone on a few shapes and their transposes.

    python benchmarks/bench_calibration_cpu.py [--steps 64] [--out benchmarks/results/calibration-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import zlib

import torch
from unipruning.kernels import reference as R
from unipruning.kernels import shared as S
from unipruning.kernels.metric_registry import stochria_tau

from unipruning.algorithm import closed_form
from unipruning.algorithm.masks import floor_count, keep_count

BLOCK = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
         "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
SUBSET_SHAPES = [(576, 1536), (1536, 576), (4096, 4096), (4096, 11008), (11008, 4096)]


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _exact(weight, sqsums, metric, keys, kappa, m):
    z, t, hint = torch.zeros(weight.shape, dtype=torch.float32), 0.0, -1
    for k, sq in enumerate(sqsums):
        vectors = R.step_vectors(weight, sq, 512, metric, keys[k])
        t, hint = R.mirror_step_(z, weight, *vectors, kappa, t, m, hint)
    return z


def _closed(weight, sqsums, metric, keys, kappa, m):
    vectors = closed_form.step_vectors(weight, sqsums, [512] * len(sqsums), metric, keys)
    return closed_form.saliency(weight, vectors, kappa, m)[0]


def _agreement(z_a, z_b, weight, sparsity: float) -> float:
    keep = keep_count(sparsity, weight.numel())
    a = S.topk_mask(R.rank_keys(z_a, weight), keep)
    b = S.topk_mask(R.rank_keys(z_b, weight), keep)
    return float((a == b).float().mean())


def block_costs(steps: int, metric: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    out, totals = {}, {"exact": 0.0, "closed_form": 0.0}
    for name, shape in BLOCK.items():
        weight = torch.randn(*shape, generator=gen) * 0.02
        sqsums = [torch.rand(shape[1], generator=gen, dtype=torch.float64) * 512 for _ in range(steps)]
        keys = [S.derive_key(0, zlib.crc32(name.encode()), k) for k in range(steps)]
        m = max(1, floor_count(0.001, weight.numel()))
        z_exact = _exact(weight, sqsums, metric, keys, 0.01, m)
        z_closed = _closed(weight, sqsums, metric, keys, 0.01, m)
        row = {"shape": list(shape),
               "exact_s": _best(lambda w=weight, s=sqsums, k=keys, mm=m: _exact(w, s, metric, k, 0.01, mm), 1),
               "closed_form_s": _best(lambda w=weight, s=sqsums, k=keys, mm=m: _closed(w, s, metric, k, 0.01, mm), 3),
               "mask_agreement": {str(s): _agreement(z_exact, z_closed, weight, s) for s in (0.01, 0.1, 0.5, 0.7)}}
        totals["exact"] += row["exact_s"]
        totals["closed_form"] += row["closed_form_s"]
        out[name] = row
    return {"matrices": out, "block_exact_s": totals["exact"], "block_closed_form_s": totals["closed_form"],
            "speedup": totals["exact"] / totals["closed_form"]}


def subset_costs() -> dict:
    gen = torch.Generator().manual_seed(1)
    out = {}
    for rows, cols in SUBSET_SHAPES:
        wabs = torch.randn(rows, cols, generator=gen).abs()
        tau = stochria_tau(rows, cols)
        out[f"{rows}x{cols}"] = {"tau": tau, "seconds": _best(lambda w=wabs, t=tau: S.stochastic_subset_sums(w, 7, t),
                                                               5)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=64, help="calibration steps (windows at batch size 1)")
    p.add_argument("--metric", default="stochria")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "calibration-cpu.json"))
    args = p.parse_args()
    result = {"device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "steps": args.steps, "metric": args.metric,
              "block": block_costs(args.steps, args.metric), "stochastic_subset_sums": subset_costs()}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({"block": {k: v for k, v in result["block"].items() if k != "matrices"},
                      "subsets": result["stochastic_subset_sums"]}, indent=1))


if __name__ == "__main__":
    main()

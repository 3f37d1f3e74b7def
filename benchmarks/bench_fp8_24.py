"""Dense bf16 vs FP8 dense vs FP8 + 2:4 on a Hopper GPU: one linear at several token counts, and a whole-model
prefill. A script (it defines no test), for a lent GPU:

    python benchmarks/bench_fp8_24.py --json fp8-h200.json [--compile] [--tokens 16,128,1024,8192]

Variants, all side by side in one process, every output checked against bf16 (SQNR) so that nothing wrong
is timed:
  bf16         F.linear on the 2:4 weight stored dense
  bf16-24      PyTorch's semi-structured CUTLASS tensor (unipruning's `pack` format)
  fp8          torchao Float8Tensor, PerRow, dynamic per-token activation quantization included
  fp8-24       torchao's FP8 + 2:4 tensor as unipruning.packing.fp8 loads it, same activation quantization
  fp8-gemm     torch._scaled_mm on operands quantized beforehand (the dense FP8 GEMM alone)
  fp8-24-gemm  torchao.ops.rowwise_scaled_linear_sparse_cutlass_f8f8 on such operands (the sparse GEMM alone)
Prefill: a Llama of Llama-3-8B width with a few layers (random weights pruned 2:4 by magnitude), the first
four variants. Times: medians of CUDA-event timed calls after warm-up. Not run yet: no GPU was lent since
it was written, so no speed is claimed for any variant.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics

import torch
from torch import nn

from unipruning.packing import fp8 as P


def timed(fn, warmup: int = 10, repeats: int = 50) -> float:
    """Median microseconds of fn() over `repeats` CUDA-event timed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.float(), got.float()
    return (10 * torch.log10(ref.pow(2).mean() / (got - ref).pow(2).mean().clamp_min(1e-30))).item()


def prune_24_(weight: torch.Tensor) -> None:
    """Keep the 2 largest |w| of every 4 consecutive inputs (in place)."""
    rows, cols = weight.shape
    groups = weight.data.view(rows, cols // 4, 4)
    groups.scatter_(-1, groups.abs().topk(2, dim=-1, largest=False).indices, 0)


def _linears(module: nn.Module, skip=("lm_head",)):
    return [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear) and not any(s in n for s in skip)]


def fp8_dense_(module: nn.Module) -> None:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(module, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and "lm_head" not in fqn)


def bf16_24_(module: nn.Module) -> None:
    from unipruning import sparsify_

    sparsify_(module, layout="cutlass")


def fp8_24_(module: nn.Module) -> None:
    for name, m in _linears(module):
        reason = P.skip_reason(m.weight.detach()) or P.sparse_support(m.weight.device)
        if reason:
            raise SystemExit(f"{name}: {reason}")
        q, scale = P.quantize_rowwise(m.weight.detach())
        P.swap_linear_(m, P.fp8_24_weight(q, scale, m.weight.dtype))


VARIANTS = {"bf16": lambda m: None, "bf16-24": bf16_24_, "fp8": fp8_dense_, "fp8-24": fp8_24_}


def gemm_only(weight: torch.Tensor, x: torch.Tensor) -> dict:
    """The two FP8 GEMMs on operands quantized beforehand (no activation quantization timed)."""
    from torchao.ops import rowwise_scaled_linear_sparse_cutlass_f8f8

    xq, xscale = P.quantize_rowwise(x)
    wq, wscale = P.quantize_rowwise(weight)
    sparse = P.fp8_24_weight(wq, wscale, x.dtype)
    xs, ws = xscale.reshape(-1).contiguous(), wscale.reshape(-1).contiguous()
    return {
        "fp8-gemm": lambda: torch._scaled_mm(xq, wq.t(), scale_a=xscale, scale_b=wscale.t(), out_dtype=x.dtype,
                                             use_fast_accum=True),
        "fp8-24-gemm": lambda: rowwise_scaled_linear_sparse_cutlass_f8f8(xq, xs, sparse.qdata, sparse.sparse_metadata,
                                                                         ws, None, x.dtype),
    }


def bench_linear(out_f: int, in_f: int, tokens: list[int], compile_: bool) -> list[dict]:
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=torch.bfloat16)
    prune_24_(base.weight)
    layers = {}
    for name, convert in VARIANTS.items():
        layers[name] = copy.deepcopy(base)
        convert(layers[name])
        layers[name] = torch.compile(layers[name]) if compile_ else layers[name]
    rows = []
    for m in tokens:
        x = torch.randn(m, in_f, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            ref = base(x)
            calls = {name: (lambda layer=layer, x=x: layer(x)) for name, layer in layers.items()}
            calls.update(gemm_only(base.weight.detach(), x))
            for name, call in calls.items():
                us = timed(call)
                rows.append({"part": "linear", "shape": f"{out_f}x{in_f}", "tokens": m, "variant": name,
                             "median_us": us, "dense_equiv_tflops": 2 * m * out_f * in_f / us / 1e6,
                             "sqnr_db_vs_bf16": sqnr(ref, call())})
    return rows


def small_llama(layers: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    for _, m in _linears(model):
        prune_24_(m.weight)
    return model


def bench_prefill(layers: int, batch: int, seq: int, compile_: bool) -> list[dict]:
    base = small_llama(layers)
    ids = torch.randint(0, 32000, (batch, seq), device="cuda")
    with torch.no_grad():
        ref = base(ids, use_cache=False).logits
    rows = []
    for name, convert in VARIANTS.items():
        model = copy.deepcopy(base)
        convert(model)
        run = torch.compile(model) if compile_ else model
        with torch.no_grad():
            logits = run(ids, use_cache=False).logits
            us = timed(lambda run=run: run(ids, use_cache=False), warmup=3, repeats=10)
        rows.append({"part": "prefill", "layers": layers, "batch": batch, "seq": seq, "variant": name,
                     "median_us": us, "tokens_per_s": batch * seq / us * 1e6, "sqnr_db_vs_bf16": sqnr(ref, logits)})
        del model, run
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--shapes", default="28672x8192,8192x28672", help="linears, out x in, comma-separated")
    parser.add_argument("--tokens", default="16,128,512,2048,8192,16384", help="token counts of the linear part")
    parser.add_argument("--prefill", default="4:1x2048,4:4x2048", help="layers:batch x seq, comma-separated")
    parser.add_argument("--compile", action="store_true", help="torch.compile every variant")
    args = parser.parse_args()
    why = P.sparse_support(torch.device("cuda")) if torch.cuda.is_available() else "no CUDA device"
    if why:
        raise SystemExit(f"error: {why}")
    rows = []
    for shape in args.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.split("x"))
        rows += bench_linear(out_f, in_f, [int(t) for t in args.tokens.split(",")], args.compile)
    for spec in filter(None, args.prefill.split(",")):
        layers, rest = spec.split(":")
        batch, seq = rest.split("x")
        rows += bench_prefill(int(layers), int(batch), int(seq), args.compile)
    import torchao

    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "torchao": torchao.__version__,
            "compile": args.compile, "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(json.dumps(meta))
    for r in rows:
        key = r.get("shape") or f"L{r['layers']} b{r['batch']} s{r['seq']}"
        print(f"{r['part']:8} {key:16} {r.get('tokens', ''):>6} {r['variant']:12} {r['median_us']:12.1f} us  "
              f"SQNR {r['sqnr_db_vs_bf16']:6.1f} dB")


if __name__ == "__main__":
    main()

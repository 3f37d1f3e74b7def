"""llm-compressor's one-shot pruning of a local model on token windows given as a .pt file.

    python benchmarks/peers/llmc_oneshot.py --model DIR --windows W.pt --out DIR --method wanda|sparsegpt \
        --sparsity 0.5 [--pattern 2:4]

The windows ((n, seqlen) int64 token ids, the ones `unipruning prune` draws) become a `datasets.Dataset`
of input_ids/attention_mask, fed unshuffled, one window per batch, untruncated. `oneshot` loads the model
from DIR itself and runs its modifier through its default (sequential, one decoder layer at a time)
pipeline; the pruned model is written as plain float32 safetensors (the state dict, tied lm_head left
out as transformers does) beside DIR's config and tokenizer, so that every method is evaluated from the
same kind of checkpoint. `llmc_settings.json` in --out records the modifier with all its fields.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

LAYER_CLASSES = {"wanda": "WandaPruningModifier", "sparsegpt": "SparseGPTModifier"}


def modifier(method: str, sparsity: float, pattern: str):
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    # llm-compressor's mask_structure "N:M" zeroes N of every M (topk smallest N); ours keeps N of M:
    # the same for 2:4 and 4:8, converted here for any other pattern
    if pattern == "unstructured":
        structure = "0:0"
    else:
        keep, m = (int(v) for v in pattern.split(":"))
        structure = f"{m - keep}:{m}"
    cls = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[method]
    # lm_head: its default targets (every Linear) include it, and here it is tied to the embeddings
    return cls(sparsity=sparsity, mask_structure=structure, ignore=["re:.*lm_head"])


def dataset(windows_path: str):
    import torch
    from datasets import Dataset

    windows = torch.load(windows_path)
    ids = windows.to(torch.int64).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]}), windows.shape


def save_plain(model, source: str, out: str) -> None:
    """The pruned weights as model.safetensors, every other file (config, tokenizer) copied from source."""
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    for name in os.listdir(source):
        path = os.path.join(source, name)
        if os.path.isfile(path) and not name.endswith(".safetensors") and not name.endswith(".index.json"):
            shutil.copy2(path, os.path.join(out, name))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--windows", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--method", choices=sorted(LAYER_CLASSES), required=True)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--pattern", default="unstructured")
    args = p.parse_args(argv)

    from llmcompressor import oneshot

    recipe = modifier(args.method, args.sparsity, args.pattern)
    data, shape = dataset(args.windows)
    model = oneshot(model=args.model, recipe=recipe, dataset=data, num_calibration_samples=shape[0],
                    max_seq_length=shape[1], shuffle_calibration_samples=False, batch_size=1)
    save_plain(model, args.model, args.out)
    with open(os.path.join(args.out, "llmc_settings.json"), "w") as f:
        json.dump({"modifier": type(recipe).__name__, "fields": recipe.model_dump(mode="json"),
                   "windows_shape": list(shape)}, f, indent=1, default=str)


if __name__ == "__main__":
    main()

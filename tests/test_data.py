"""Text sources -> windows: .txt, directories, .jsonl, through datasets and without it; perplexity."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests._utils import tokenizer
from unipruning import UsageError, perplexity
from unipruning import data as D


@pytest.fixture()
def sources(tmp_path):
    docs = ["First document.\nWith two lines.", "Second one, longer: " + "words " * 50, "Third."]
    root = tmp_path / "texts"
    (root / "nested").mkdir(parents=True)
    (root / "a.txt").write_text(docs[0])
    (root / "nested" / "b.txt").write_text(docs[1])
    (root / "c.txt").write_text(docs[2])
    (root / "ignored.md").write_text("not text")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n")
    return root, jsonl, docs


def test_directory_is_read_recursively_in_sorted_order(sources):
    root, _, docs = sources
    assert D.read_documents(str(root)) == [docs[0], docs[2], docs[1]]  # a.txt, c.txt, nested/b.txt


def test_jsonl_text_field(sources):
    _, jsonl, docs = sources
    assert D.read_documents(str(jsonl)) == docs


def test_datasets_loaders_and_plain_reading_agree(sources):
    root, jsonl, _ = sources
    for source in (root, jsonl):
        files = D._local_files(str(source), "--calib")
        assert D._read_local(files, "--calib") == D._read_plain(files, "--calib")


def test_jsonl_without_text_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(UsageError, match="text"):
        D.read_documents(str(bad))


def test_calibration_windows_are_seeded(text_file):
    a = D.calibration_windows(tokenizer(), text_file, 6, 20, seed=0)
    b = D.calibration_windows(tokenizer(), text_file, 6, 20, seed=0)
    c = D.calibration_windows(tokenizer(), text_file, 6, 20, seed=1)
    assert a.shape == (6, 20) and torch.equal(a, b) and not torch.equal(a, c)
    assert D.windows_hash(a) == D.windows_hash(b) != D.windows_hash(c)
    ids = D.tokenize(tokenizer(), D.read_documents(text_file))[0]
    start = (ids.unfold(0, 20, 1) == a[0]).all(1).nonzero()
    assert start.numel() >= 1  # every window is a contiguous span of the tokenized text


def test_eval_windows_are_non_overlapping(text_file):
    ids = D.tokenize(tokenizer(), D.read_documents(text_file))[0]
    w = D.eval_windows(tokenizer(), text_file, 100)
    assert w.shape == (ids.numel() // 100, 100)
    assert torch.equal(w.flatten(), ids[: w.numel()])


def test_perplexity_matches_the_model_loss(tiny_llama, text_file):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    windows = D.eval_windows(tokenizer(), text_file, 64)[:5]
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    assert perplexity(model, windows, torch.device("cpu"), batch_size=2) == pytest.approx(
        math.exp(sum(losses) / len(losses)), rel=1e-5)

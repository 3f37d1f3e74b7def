"""The papers' data protocols (Wanda lib/data.py, SparseGPT datautils.py) on local copies shaped like the hub's
datasets (allenai/c4's json.gz shards, wikitext-2-raw-v1's parquet files), read through load_dataset without
network; and the one-line answers when the hub is unreachable.

The expected windows are the papers' loops written out again here (Python's random, documents tokenized
one by one), independently of unipruning/data.py."""

import gzip
import json
import random

import pytest
import torch

from tests._utils import tokenizer
from unipruning import UsageError, offline
from unipruning import data as D
from unipruning.data import packaged_text


def _paragraphs():
    text = "\n\n".join(packaged_text(("macbeth", "tempest")))
    return [p.strip() for p in text.split("\n\n") if p.strip()]


@pytest.fixture(scope="module")
def c4_copy(tmp_path_factory):
    """A directory laid out like allenai/c4 (en/c4-{train,validation}.*.json.gz of JSON lines)."""
    root = tmp_path_factory.mktemp("c4")
    (root / "en").mkdir()
    paras = _paragraphs()
    # documents of very different lengths, as in c4: single paragraphs and runs of twenty
    train = [" ".join(paras[i : i + (20 if i % 3 == 0 else 1)]) for i in range(0, 600)]
    valid = [" ".join(paras[i : i + 3]) for i in range(600, 1400, 1)][:1200]
    for name, docs in ((D.C4_TRAIN, train), (D.C4_VALIDATION, valid)):
        with gzip.open(root / name, "wt", encoding="utf-8") as f:
            for i, doc in enumerate(docs):
                f.write(json.dumps({"text": doc, "timestamp": "2019-04-25T12:57:54Z", "url": f"u{i}"}) + "\n")
    return str(root), train, valid


@pytest.fixture(scope="module")
def wikitext_copy(tmp_path_factory):
    """A directory laid out like the hub's wikitext (wikitext-2-raw-v1/{train,test}-00000-of-00001.parquet)
    with wikitext's line structure: headings, paragraphs and empty lines."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("wikitext")
    (root / D.WIKITEXT_CONFIG).mkdir()
    lines = []
    for i, para in enumerate(_paragraphs()):
        lines += ["", f" = Section {i} = ", "", " " + para.replace("\n", " ") + " "]
    for split, part in (("train", lines[: len(lines) * 3 // 4]), ("test", lines[len(lines) * 3 // 4 :])):
        pq.write_table(pa.table({"text": part}), root / D.WIKITEXT_CONFIG / f"{split}-00000-of-00001.parquet")
    return str(root), lines[: len(lines) * 3 // 4], lines[len(lines) * 3 // 4 :]


def _ids(text):
    return tokenizer()(text, return_tensors="pt").input_ids[0]


def test_c4_calibration_is_the_papers_draw(c4_copy):
    root, train, _ = c4_copy
    got = D.calibration_windows(tokenizer(), f"c4:{root}", 6, 64, seed=3)
    random.seed(3)  # the papers' loop: global random, documents longer than seqlen, a window in each
    expected = []
    for _ in range(6):
        while True:
            ids = _ids(train[random.randint(0, len(train) - 1)])
            if ids.numel() > 64:
                break
        i = random.randint(0, ids.numel() - 64 - 1)
        expected.append(ids[i : i + 64])
    assert torch.equal(got, torch.stack(expected))


def test_c4_calibration_refuses_a_seqlen_no_document_reaches(c4_copy, monkeypatch):
    monkeypatch.setattr(D, "MAX_DRAWS", 50)
    with pytest.raises(UsageError, match="no document of more than 100000 tokens in 50 draws"):
        D.calibration_windows(tokenizer(), f"c4:{c4_copy[0]}", 1, 100_000, seed=0)


def test_c4_validation_is_the_first_1100_documents_joined_with_a_space(c4_copy):
    root, _, valid = c4_copy
    got = D.eval_windows(tokenizer(), f"c4:{root}", 32)
    ids = _ids(" ".join(valid[:1100]))[: 256 * 32]
    assert got.shape == (256, 32) and torch.equal(got.flatten(), ids)


def test_wikitext2_test_split_joined_with_blank_lines(wikitext_copy):
    root, _, test = wikitext_copy
    got = D.eval_windows(tokenizer(), f"wikitext2:{root}", 50)
    ids = _ids("\n\n".join(test))  # empty lines kept, as the papers' join keeps them
    assert got.shape == (ids.numel() // 50, 50) and torch.equal(got.flatten(), ids[: got.numel()])


def test_wikitext2_calibration_joins_train_with_a_space(wikitext_copy):
    root, train, _ = wikitext_copy
    got = D.calibration_windows(tokenizer(), f"wikitext2:{root}", 5, 40, seed=0)
    ids = _ids(" ".join(train))
    random.seed(0)
    starts = [random.randint(0, ids.numel() - 40 - 1) for _ in range(5)]
    assert torch.equal(got, torch.stack([ids[s : s + 40] for s in starts]))


def test_a_local_copy_without_the_files_is_one_line(tmp_path):
    with pytest.raises(UsageError, match="does not hold the files"):
        D.eval_windows(tokenizer(), f"c4:{tmp_path}", 32)
    with pytest.raises(UsageError, match="is not a directory"):
        D.read_documents(f"c4:{tmp_path / 'missing'}")


def test_offline_hub_source_is_one_line_naming_the_way_out(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", tmp_path / "datasets")
    with pytest.raises(UsageError) as info:
        D.calibration_windows(tokenizer(), "c4", 2, 32, seed=0)
    message = str(info.value)
    assert "\n" not in message and "unreachable (HF_HUB_OFFLINE is set)" in message and "c4:DIR" in message


def test_unreachable_hub_answers_before_datasets_retries(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    offline.forget()
    monkeypatch.setattr(offline, "_probe", lambda timeout: "https://huggingface.co did not answer (ConnectError)")
    try:
        with pytest.raises(UsageError, match=r"`data` wikitext2 is read from the Hugging Face hub.*did not answer"):
            D.eval_windows(tokenizer(), "wikitext2", 32)
    finally:
        offline.forget()


@pytest.mark.parametrize("config,expected", [
    ({"max_position_embeddings": 2048}, 2048),   # LLaMA-1, OPT: Wanda and SparseGPT's 2048
    ({"max_position_embeddings": 4096}, 4096),   # Llama-2: Wanda's model.seqlen
    ({"max_position_embeddings": 131072}, 4096),  # Llama-3.1: capped
    ({"n_positions": 1024}, 1024),
    ({"text_config": {"max_position_embeddings": 8192}}, 4096),
    ({}, 2048),
])
def test_default_seqlen_follows_the_model_context(config, expected):
    assert D.default_seqlen(config) == expected

"""`unipruning eval --tasks` through lm-evaluation-harness, on a local task definition and local data
(no hub): the CLI's accuracy equals lm-eval's own run on the same model, --tokenizer serves checkpoints
without one, and missing pieces are one-line errors."""

import builtins
import json
import os
import shutil

import pytest

from tests._utils import make_checkpoint
from unipruning.cli import main

QUESTIONS = [("Is fire hot?", "yes"), ("Is ice hot?", "no"), ("Do fish swim?", "yes"), ("Do stones sing?", "no"),
             ("Is the sea wet?", "yes"), ("Is night bright?", "no")]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    with open(d / "data.jsonl", "w") as f:
        for q, a in QUESTIONS:
            f.write(json.dumps({"question": q, "choices": ["yes", "no"], "label": ["yes", "no"].index(a)}) + "\n")
    (d / "local_yesno.yaml").write_text(
        "task: local_yesno\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    validation: {d / 'data.jsonl'}\nvalidation_split: validation\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n")
    return str(d)


def test_eval_tasks_matches_lm_eval_directly(tmp_path, task_dir, capsys):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = make_checkpoint(tmp_path / "m")
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    for f in os.listdir(model):
        if f.startswith(("config", "model", "generation")):
            shutil.copy(os.path.join(model, f), no_tok / f)
    assert main(["eval", "--model", str(no_tok), "--tokenizer", model, "--tasks", "local_yesno",
                 "--include-path", task_dir, "--device", "cpu", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    lm = HFLM(pretrained=AutoModelForCausalLM.from_pretrained(model), tokenizer=AutoTokenizer.from_pretrained(model),
              batch_size=8, device="cpu")
    direct = lm_eval.simple_evaluate(
        model=lm,
        tasks=["local_yesno"], task_manager=TaskManager(include_path=task_dir), log_samples=False)
    assert ours["tasks"]["local_yesno"]["acc,none"] == direct["results"]["local_yesno"]["acc,none"]
    assert ours["tasks"]["local_yesno"]["acc,none"] in {i / 6 for i in range(7)}


def test_eval_task_errors_are_one_line(tmp_path, task_dir, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    model = make_checkpoint(tmp_path / "m")
    assert main(["eval", "--model", model, "--tasks", "no_such_task", "--include-path", task_dir]) == 2
    assert "lm-eval knows no task 'no_such_task'" in capsys.readouterr().err
    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name.startswith("lm_eval"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    assert main(["eval", "--model", model, "--tasks", "boolq"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'unipruning[eval]'" in err

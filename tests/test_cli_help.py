"""Help that teaches: every option of every command has a help text and shows its default, every command
has examples, `unipruning` alone lists the commands; and the vocabulary of Wanda and SparseGPT users."""

import argparse

import pytest

from unipruning import UsageError
from unipruning.cli import PRUNE_METHODS, _method_settings, build_parser, main

COMMANDS = ("prune", "mask", "eval", "pack", "demo")


def _subparsers():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_and_shows_its_default(command, capsys):
    parser = _subparsers()[command]
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare with spaces collapsed
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{command} {action.option_strings}: no help text"
        if action.default is None or isinstance(action.default, bool):
            continue  # said in words by the help text itself ("default: ...", "off: ...")
        assert f"(default: {action.default})" in text, f"{command} {action.option_strings[0]}: default not shown"
    assert text.count(f"unipruning {command}") >= 3  # the usage line and at least two examples


def test_no_arguments_lists_the_commands_one_line_each(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("  ")]
    assert [line.split()[0] for line in lines] == list(COMMANDS)
    assert "--help" in out


@pytest.mark.parametrize("argv,needle", [
    (["prune", "--model", "m", "--save", "out/wanda/", "--out", "o"], "unrecognized arguments: --save"),
    (["prune", "--model", "m", "--save", "out/wanda/"], "required: --out/--save_model"),
    (["prune", "--model", "m", "--out", "o", "--nsampl", "4"], "unrecognized arguments: --nsampl"),
    (["mask", "--mod", "m", "--saliency", "s", "--out", "o"], "--model"),
    (["--verb", "eval", "--model", "m"], "unrecognized arguments: --verb"),
], ids=["save-is-not-save_model", "save-alone", "nsampl", "mask-mod", "top-level-verb"])
def test_abbreviated_options_are_refused_not_guessed(argv, needle, capsys, tmp_path):
    """argparse took `--save out/wanda/` (Wanda's log folder) for `--save_model`: with abbreviations off on
    every parser an option is spelled out or refused, in one line, exit 2, before anything is read."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    for parser in [build_parser(), *_subparsers().values()]:
        assert parser.allow_abbrev is False


def _prune_args(*extra):
    return build_parser().parse_args(["prune", "--model", "m", "--out", "o", *extra])


def test_wanda_and_sparsegpt_flags_are_aliases():
    args = _prune_args("--sparsity_ratio", "0.6", "--sparsity_type", "4:8", "--cache_dir", "/c", "--save_model",
                       "./pruned", "--percdamp", "0.1", "--blocksize", "64", "--nsamples", "32", "--seed", "3")
    assert (args.sparsity, args.pattern, args.cache_dir, args.out) == (0.6, "4:8", "/c", "./pruned")
    assert (args.percdamp, args.blocksize, args.nsamples, args.seed) == (0.1, 64, 32, 3)


@pytest.mark.parametrize("method,pattern,expected", [
    ("wanda", "unstructured", {"metric": "wanda", "allocation": "row", "batch_size": 32}),
    ("wanda", "2:4", {"metric": "wanda", "allocation": "layer", "batch_size": 32}),  # N:M has no row budget
    ("magnitude", "unstructured", {"metric": "magnitude", "allocation": "layer", "batch_size": 32}),
    ("sparsegpt", "unstructured", {"metric": "sparsegpt", "reconstruct": "obs", "batch_size": 1}),
])
def test_prune_method_sets_the_options_it_stands_for(method, pattern, expected):
    args = _prune_args("--prune_method", method, "--sparsity_type", pattern, "--nsamples", "32")
    _method_settings(args)
    assert {k: getattr(args, k) for k in expected} == expected
    assert set(PRUNE_METHODS) == {"wanda", "magnitude", "sparsegpt"}


def _usage_error(capsys, tmp_path, *options) -> str:
    """The one line `unipruning prune OPTIONS` prints when it exits 2 before reading the model."""
    assert main(["prune", "--model", str(tmp_path), "--out", str(tmp_path / "o"), *options]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_prune_method_contradicted_by_an_option_is_one_line(capsys, tmp_path):
    with pytest.raises(UsageError, match="`metric` ria contradicts --prune_method wanda"):
        _method_settings(_prune_args("--prune_method", "wanda", "--metric", "ria"))
    err = _usage_error(capsys, tmp_path, "--prune_method", "wanda", "--allocation", "global")
    assert "--allocation global contradicts --prune_method wanda" in err, err
    args = _prune_args("--prune_method", "sparsegpt", "--batch-size", "4")  # what it does not set stays free
    _method_settings(args)
    assert args.batch_size == 4 and args.reconstruct == "obs"


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("preset,expected", [
    ("quality", {"reconstruct": "obs", "guide_alpha": 1.0, "allocation": "owl"}),
    ("fast", {"reconstruct": "none", "guide_alpha": None, "allocation": "owl-row"})])
def test_preset_sets_the_reconstruction_and_allocation_and_nothing_else(preset, expected, pattern):
    args = _prune_args("--preset", preset, "--sparsity", "0.6", "--pattern", pattern)
    before = {k: v for k, v in vars(args).items() if k not in ("preset", *expected)}
    _method_settings(args)
    if pattern != "unstructured":  # N:M masks are cut per group of M
        expected = {**expected, "allocation": "layer"}
    assert {k: getattr(args, k) for k in expected} == expected
    assert {k: v for k, v in vars(args).items() if k not in ("preset", *expected)} == before


def test_preset_quality_combines_with_a_metric_and_refuses_what_it_cannot_guide(capsys, tmp_path):
    args = _prune_args("--preset", "quality", "--metric", "ria")
    _method_settings(args)
    assert (args.metric, args.reconstruct, args.guide_alpha) == ("ria", "obs", 1.0)
    with pytest.raises(UsageError, match="`guide_alpha` 2.0 contradicts --preset quality"):
        _method_settings(_prune_args("--preset", "quality", "--guide-alpha", "2"))
    err = _usage_error(capsys, tmp_path, "--preset", "quality", "--allocation", "row")
    assert "--allocation row contradicts --preset quality" in err, err
    err = _usage_error(capsys, tmp_path, "--preset", "fast", "--reconstruct", "obs", "--guide-alpha", "1")
    assert "per row" in err, err

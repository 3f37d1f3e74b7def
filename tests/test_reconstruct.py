"""Weight reconstruction (`--reconstruct obs`) and SparseGPT's masks (`--metric sparsegpt`): the OBS twin
against an independent oracle, exact counts, the Hessian's failure modes, and the CLI end to end."""

import json
import logging
import os

import pytest
import torch
from transformers import AutoModelForCausalLM
from unipruning.kernels.reference import hessian_accumulate_, nm_mask, obs_sweep_
from unipruning.kernels.shared import obs_inverse_factor

from tests._utils import dies_after, prunable, read_all
from unipruning import PruneConfig, UsageError, prune
from unipruning.algorithm.masks import keep_count
from unipruning.algorithm.obs import inverse_factor
from unipruning.cli import main

SMALL = ["--nsamples", "8", "--seqlen", "32"]


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def problem(rows=48, cols=320, tokens=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs (a few directions dominate), as in real activations: reconstruction has room
    x = torch.randn(tokens, 24, generator=g) @ torch.randn(24, cols, generator=g) + 0.3 * torch.randn(
        tokens, cols, generator=g)
    w = torch.randn(rows, cols, generator=g)
    h = torch.zeros(cols, cols)
    hessian_accumulate_(h, x)
    return x, w, h.mul_(2 / tokens)


def classical_obs(w, h, keep, damp=0.01):
    """Sequential OBS with explicit inverse-Hessian downdates (no Cholesky trick): for column i in order,
    err = (w_i - q_i) / Hinv_ii, w -= err * Hinv[i, :], then remove i from Hinv."""
    h = h.clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = torch.linalg.inv(h.double())
    w = w.double().clone()
    for i in range(w.shape[1]):
        q = torch.where(keep[:, i], w[:, i], 0.0)
        err = (w[:, i] - q) / hinv[i, i]
        w -= err[:, None] * hinv[i][None, :]
        w[:, i] = q
        hinv = hinv - hinv[:, i : i + 1] @ hinv[i : i + 1, :] / hinv[i, i]
    return w.float()


def test_sweep_equals_classical_obs_and_lazy_batches_change_nothing():
    _, w, h = problem()
    keep = nm_mask(torch.rand(w.shape, generator=torch.Generator().manual_seed(1)), 2, 4)
    u, dead = obs_inverse_factor(h, 0.01)
    assert not dead.any()
    blocked, whole = w.clone(), w.clone()
    obs_sweep_(blocked, u, keep, blocksize=128)  # 320 columns: blocks of 128, 128, 64
    obs_sweep_(whole, u, keep, blocksize=320)
    torch.testing.assert_close(blocked, whole, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(blocked, classical_obs(w, h, keep), rtol=1e-3, atol=1e-3)


def test_reconstruction_beats_masking_and_keeps_the_mask():
    x, w, h = problem(seed=2)
    keep = torch.zeros_like(w, dtype=torch.bool)
    keep.view(-1)[w.abs().view(-1).argsort(descending=True)[: w.numel() * 3 // 10]] = True  # 70% sparse
    u, _ = obs_inverse_factor(h, 0.01)
    rebuilt = w.clone()
    assert torch.equal(obs_sweep_(rebuilt, u, keep), keep)
    assert not torch.signbit(rebuilt[~keep]).any() and bool((rebuilt[~keep] == 0).all())

    def error(v):
        return float(((x @ (w - v).T) ** 2).mean())

    assert error(rebuilt) < 0.6 * error(w * keep)


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_sparsegpt_rule_counts_are_exact(nm):
    _, w, h = problem(rows=40, cols=384, seed=3)
    u, _ = obs_inverse_factor(h, 0.01)
    rebuilt = w.clone()
    if nm is None:
        count = w.numel() - keep_count(0.7, w.numel())
        keep = obs_sweep_(rebuilt, u, prune_count=count)
        assert int((~keep).sum()) == count
    else:
        keep = obs_sweep_(rebuilt, u, nm=nm)
        assert bool((keep.reshape(40, -1, nm[1]).sum(-1) == nm[0]).all())
    assert bool((rebuilt[~keep] == 0).all())


def test_dead_inputs_and_failed_factorisations_do_not_crash(caplog):
    _, _, h = problem(cols=64)
    h[5, :] = h[:, 5] = 0  # an input that is always zero
    u, dead = obs_inverse_factor(h, 0.01)
    assert u is not None and dead.nonzero().flatten().tolist() == [5]
    indefinite = torch.eye(64)
    indefinite[0, 0] = -2.0  # Cholesky fails until the dampening (relative to the mean diagonal) dominates
    with caplog.at_level(logging.WARNING, logger="unipruning"):
        u, _ = inverse_factor(indefinite, "m")
    assert u is not None and "needed dampening" in caplog.text
    with caplog.at_level(logging.WARNING, logger="unipruning"):
        u, _ = inverse_factor(torch.full((64, 64), float("nan")), "nan")
    assert u is None and "masked without reconstruction" in caplog.text


def test_diagonal_dampening_adds_a_share_of_each_inputs_own_energy():
    from unipruning.algorithm.obs import dampen_diagonal

    h = torch.tensor([[4.0, 1.0], [1.0, 0.5]])
    assert torch.equal(dampen_diagonal(h, 0.5), torch.tensor([[6.0, 1.0], [1.0, 0.75]]))
    assert torch.equal(h, torch.tensor([[4.0, 1.0], [1.0, 0.5]]))  # a new tensor: the group's H is shared
    assert dampen_diagonal(h, 0.0) is h


def test_diagonal_dampening_trades_calibration_fit_for_inputs_without_its_correlations():
    """Calibration inputs with strong cross-channel correlations; other inputs with the same channel energies
    and none of them (Gram = diag H). There any update of the kept weights only adds error (mask-only is
    optimal), so the stronger the diagonal dampening, the smaller the update and that excess, while the
    calibration error grows toward mask-only's."""
    from unipruning.algorithm.obs import ObsSettings, reconstruct_weight, sweep_rule
    from unipruning.config import MaskSpec

    x, w, h = problem(seed=4)
    keep = torch.zeros_like(w, dtype=torch.bool)
    score = (w.abs() * h.diagonal().sqrt()).reshape(-1)
    keep.view(-1)[score.argsort(descending=True)[: w.numel() // 2]] = True
    masked = torch.where(keep, w, 0.0)

    def error(v, gram):
        d = (w - v).double()
        return float(((d @ gram.double()) * d).sum())

    calib, other, update = [], [], []
    for strength in (0.0, 0.3, 3.0, 1e5):
        rule = sweep_rule(MaskSpec(0.5), w.numel(), keep)
        v, kept = reconstruct_weight(w, h, rule, "m", ObsSettings(diag_damp=strength), "torch")
        assert torch.equal(kept, keep)
        calib.append(error(v, h))
        other.append(error(v, torch.diag(h.diagonal())))
        update.append(float((v - masked).norm() / w.norm()))
    # from 0.3 on the calibration error grows toward mask-only's (below 0.3 it may even fall: the greedy sweep
    # is not the least-squares optimum over the kept weights)
    assert calib[1:] == sorted(calib[1:]) and max(calib[:3]) < 0.5 * error(masked, h)
    assert other == sorted(other, reverse=True) and other[0] > 1.2 * error(masked, torch.diag(h.diagonal()))
    assert update == sorted(update, reverse=True) and update[-1] < 1e-3 < update[0]


# ---------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama, text_file):
    base = tmp_path_factory.mktemp("recon")
    out = {}
    for key, extra in {
        "mask": [],
        "obs": ["--reconstruct", "obs"],
        "sparsegpt": ["--metric", "sparsegpt", "--reconstruct", "obs"],
    }.items():
        out[key] = str(base / key)
        # one budget per matrix, the count the tests check (the default, auto, is tested in test_defaults.py)
        assert run_cli("prune", "--model", tiny_llama, "--out", out[key], "--sparsity", "0.7", "--calib", text_file,
                       "--allocation", "layer", *SMALL, *extra) == 0
    return out


def test_obs_keeps_the_saliency_mask_and_changes_only_kept_weights(runs, tiny_llama):
    source, masked_only, rebuilt = read_all(tiny_llama), read_all(runs["mask"]), read_all(runs["obs"])
    names = set(prunable(tiny_llama))
    for key, tensor in rebuilt.items():
        if key not in names:
            assert torch.equal(tensor, source[key]), key
            continue
        assert torch.equal(tensor == 0, masked_only[key] == 0), key  # same mask (no kept weight hit 0 here)
        assert not torch.signbit(tensor[tensor == 0]).any()
        assert not torch.equal(tensor, masked_only[key]), f"{key} was not reconstructed"
        assert int((tensor != 0).sum()) == keep_count(0.7, tensor.numel())
    assert os.path.isdir(os.path.join(runs["obs"], "saliency"))
    assert not os.path.isdir(os.path.join(runs["sparsegpt"], "saliency"))


def test_reconstruction_brings_the_model_closer_to_the_dense_one(runs, tiny_llama):
    ids = torch.randint(0, 400, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = AutoModelForCausalLM.from_pretrained(tiny_llama)(ids).logits

        def distance(path):
            return float((AutoModelForCausalLM.from_pretrained(path)(ids).logits - dense).pow(2).mean())

        assert distance(runs["obs"]) < distance(runs["mask"])
        assert distance(runs["sparsegpt"]) < distance(runs["mask"])


def test_mask_with_reconstruction_equals_prune_with_it(runs, tiny_llama, text_file, tmp_path):
    out = tmp_path / "remasked"
    assert run_cli("mask", "--model", tiny_llama, "--saliency", os.path.join(runs["obs"], "saliency"), "--out", out,
                   "--sparsity", "0.7", "--allocation", "layer", "--reconstruct", "obs", "--calib", text_file) == 0
    a, b = read_all(out), read_all(runs["obs"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_reconstruction_resumes_to_the_same_bytes(runs, tiny_llama, text_file, tmp_path, monkeypatch):
    import unipruning.pipeline.reconstruct as recon

    out = tmp_path / "resumed"
    argv = ["prune", "--model", tiny_llama, "--out", out, "--sparsity", "0.7", "--calib", text_file, *SMALL,
            "--allocation", "layer", "--reconstruct", "obs"]
    original = dies_after(monkeypatch, recon, "reconstruct_weight", 7)  # block 0's seven matrices are done and saved
    assert run_cli(*argv) == 130
    partial = [p for p in os.listdir(tmp_path) if p.startswith(".resumed.partial-")]
    assert len(partial) == 1 and os.listdir(tmp_path / partial[0] / ".recon") == ["block-00000.safetensors"]
    monkeypatch.setattr(recon, "reconstruct_weight", original)
    assert run_cli(*argv) == 0
    a, b = read_all(out), read_all(runs["obs"])
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--metric", "sparsegpt"], "pass --reconstruct obs"),
        (["--metric", "sparsegpt", "--reconstruct", "obs", "--allocation", "row"], "--allocation row"),
        (["--reconstruct", "sgd"], "--reconstruct"),
        (["--reconstruct", "obs", "--diag-damp", "-1"], "--diag-damp"),
    ],
)
def test_bad_reconstruction_settings(argv, needle, tiny_llama, text_file, tmp_path, capsys):
    assert run_cli("prune", "--model", tiny_llama, "--out", tmp_path / "o", "--calib", text_file, *argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not os.listdir(tmp_path)


def test_mask_with_diagonal_dampening_keeps_the_mask_and_records_it(runs, tiny_llama, text_file, tmp_path):
    out = tmp_path / "diag"
    assert run_cli("mask", "--model", tiny_llama, "--saliency", os.path.join(runs["obs"], "saliency"), "--out", out,
                   "--sparsity", "0.7", "--allocation", "layer", "--reconstruct", "obs", "--calib", text_file,
                   "--diag-damp", "0.5") == 0
    a, b, masked_only = read_all(out), read_all(runs["obs"]), read_all(runs["mask"])
    for name in prunable(tiny_llama):
        assert torch.equal(a[name] == 0, b[name] == 0), name
        # the update shrinks toward mask-only (the masked original weights) without reaching it
        assert 0 < float((a[name] - masked_only[name]).norm()) < float((b[name] - masked_only[name]).norm()), name
    with open(os.path.join(out, "pruning_report.json")) as f:
        assert json.load(f)["reconstruction"]["diag_damp"] == 0.5
    with open(os.path.join(runs["obs"], "pruning_report.json")) as f:
        assert "diag_damp" not in json.load(f)["reconstruction"]  # the default leaves reports as they were


def test_mask_reconstruction_needs_calib(runs, tiny_llama, tmp_path, capsys):
    assert run_cli("mask", "--model", tiny_llama, "--saliency", os.path.join(runs["obs"], "saliency"),
                   "--out", tmp_path / "o", "--reconstruct", "obs") == 2
    assert "pass --calib" in capsys.readouterr().err


def test_in_memory_prune_refuses_reconstruction():
    with pytest.raises(UsageError, match="prune_checkpoint"):
        prune(torch.nn.Module(), torch.zeros(1, 4, dtype=torch.long), PruneConfig(reconstruct="obs"))


def test_a_flat_prior_leaves_sparsegpts_rule_unchanged_and_a_steep_one_follows_the_prior():
    _, w, h = problem()
    u, _ = obs_inverse_factor(h, 0.01)
    count = w.numel() // 2
    plain, flat = w.clone(), w.clone()
    keep_plain = obs_sweep_(plain, u, prune_count=count)
    keep_flat = obs_sweep_(flat, u, prune_count=count, prior=torch.ones_like(w))
    assert torch.equal(keep_plain, keep_flat) and torch.equal(plain, flat)
    ranks = torch.rand(w.shape, generator=torch.Generator().manual_seed(1))
    steep = w.clone()
    keep_steep = obs_sweep_(steep, u, prune_count=count, prior=ranks.pow(40))  # the prior decides
    assert int((~keep_steep).sum()) == count
    agree = (keep_steep == (ranks > ranks.reshape(-1).kthvalue(count).values)).float().mean()
    assert agree > (keep_plain == keep_steep).float().mean() and agree > 0.9


def test_guide_prior_is_the_saliency_rank():
    from unipruning.algorithm.obs import guide_prior

    z = torch.tensor([[0.3, 0.1], [0.4, 0.2]])
    prior = guide_prior(z, torch.ones(2, 2), 1.0, "torch")
    assert torch.equal(prior, torch.tensor([[0.75, 0.25], [1.0, 0.5]]))
    assert torch.equal(guide_prior(z, torch.ones(2, 2), 0.0, "torch"), torch.ones(2, 2))


def test_guided_reconstruction_end_to_end(tiny_llama, text_file, tmp_path):
    out = tmp_path / "guided"
    assert run_cli("prune", "--model", tiny_llama, "--out", out, "--calib", text_file, *SMALL, "--sparsity", "0.6",
                   "--allocation", "layer", "--reconstruct", "obs", "--guide-alpha", "0.5") == 0
    tensors = read_all(out)
    for name in prunable(tiny_llama):
        w = tensors[name]
        assert int((w == 0).sum()) == w.numel() - keep_count(0.6, w.numel()), name
        assert not torch.signbit(w[w == 0]).any()
    with pytest.raises(UsageError, match="pass `reconstruct` obs"):
        PruneConfig(guide_alpha=1.0)
    with pytest.raises(UsageError, match="`metric` sparsegpt has none"):
        PruneConfig(metric="sparsegpt", reconstruct="obs", guide_alpha=1.0)


def test_without_true_sequential_every_group_sees_the_block_as_it_came_in(runs, tiny_llama, text_file, tmp_path):
    """--no-true-sequential (llm-compressor's order): o_proj's Hessian is that of the DENSE attention's
    output, computed here independently from the dense model; q/k/v (first group) are as before."""
    from transformers import AutoTokenizer

    from unipruning.algorithm.obs import reconstruct_weight, sweep_rule
    from unipruning.config import MaskSpec
    from unipruning.data import calibration_windows

    out = tmp_path / "llmc-order"
    assert run_cli("mask", "--model", tiny_llama, "--saliency", os.path.join(runs["obs"], "saliency"), "--out", out,
                   "--sparsity", "0.7", "--allocation", "layer", "--reconstruct", "obs", "--calib", text_file,
                   "--no-true-sequential") == 0
    ours, sequential, masked_only = read_all(out), read_all(runs["obs"]), read_all(runs["mask"])
    block = "model.layers.0."
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        assert torch.equal(ours[f"{block}{name}.weight"], sequential[f"{block}{name}.weight"]), name

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    windows = calibration_windows(AutoTokenizer.from_pretrained(tiny_llama), text_file, 8, 32, 0)
    seen = []
    model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(windows)
    x = torch.cat(seen).reshape(-1, seen[0].shape[-1])
    h = torch.zeros(x.shape[1], x.shape[1])
    hessian_accumulate_(h, x)
    name = f"{block}self_attn.o_proj.weight"
    weight = model.model.layers[0].self_attn.o_proj.weight.data
    rule = sweep_rule(MaskSpec(0.7), weight.numel(), masked_only[name] != 0)
    expected, _ = reconstruct_weight(weight, h.mul_(2 / x.shape[0]), rule, name, backend="torch")
    assert torch.allclose(ours[name], expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(sequential[name], expected, rtol=1e-4, atol=1e-5)
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["reconstruction"]["true_sequential"] is False
    with pytest.raises(UsageError, match="true_sequential"):
        PruneConfig(reconstruct="obs", true_sequential="no")

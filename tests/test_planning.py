"""`prune --dry-run`'s time estimate: a probe of block 0 on this device, extrapolated to every block and step.

The extrapolation is tested as arithmetic. Whether the estimate is within a factor of a real run's time is
not asserted: on our loaded 2-core machines the probe's timings of the same command swung from 28 s to 403 s
for a run that took 158 s (the demo model, 128 x 128 tokens, 2026-12-01), so any fixed factor would be flaky."""

import pytest

from unipruning.config import Calibration, PruneConfig, RunOptions
from unipruning.jobs import prune_checkpoint
from unipruning.pipeline.planning import PROBE_STEPS, extrapolate


def test_extrapolation_is_fixed_plus_per_step_per_block_plus_reading():
    probe = {"read_seconds": 0.5, "probe_seconds": {1: 3.0, 3: 7.0}}  # 2 s per step, 1 s fixed
    est = extrapolate(probe, steps=128, blocks=32)
    assert est["step_seconds"] == 2.0 and est["block_fixed_seconds"] == 1.0
    assert est["block_seconds"] == 1.0 + 2.0 * 128 + 0.5
    assert est["calibration_seconds"] == 32 * est["block_seconds"]


def test_a_noisy_probe_never_gives_negative_terms():
    est = extrapolate({"read_seconds": 0.0, "probe_seconds": {1: 5.0, 3: 4.0}}, steps=10, blocks=2)
    assert est["step_seconds"] == 0.0 and est["block_fixed_seconds"] == 5.0  # slower first run: fixed cost only


@pytest.mark.parametrize("config,probed", [(PruneConfig(), True), (PruneConfig(metric="sparsegpt",
                                                                               reconstruct="obs"), False)])
def test_the_probe_runs_block_0_for_real_and_writes_nothing(tiny_llama, text_file, tmp_path, config, probed):
    plan = prune_checkpoint(tiny_llama, str(tmp_path / "o"), config, Calibration(text_file, 8, 16),
                            RunOptions(dry_run=True))
    est = plan.estimate
    assert not (tmp_path / "o").exists() and not list(tmp_path.iterdir())
    if probed:
        assert sorted(est["probe"]["probe_seconds"]) == list(PROBE_STEPS)
        assert all(t > 0 for t in est["probe"]["probe_seconds"].values())
        assert est["seconds"] == pytest.approx(est["calibration"]["calibration_seconds"])
        assert "timed probe of block 0" in est["note"]
    else:  # no layer-streamed calibration to probe: an arithmetic lower bound, said so
        assert est["probe"] is None and "lower bound" in est["note"] and est["seconds"] > 0

"""Learning the saliency, the mode chosen once: layer-streamed (feedback none, pipeline/calibrate.py),
along a fine-tuning trajectory (feedback full, pipeline/feedback.py), or none at all (the sparsegpt
metric chooses its masks during the OBS sweep)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..config import PruneConfig
from ..io.checkpoint import check_finite, load_model
from ..io.report import Report
from ..io.saliency import Saliency
from .calibrate import calibrate
from .feedback import calibrate_full
from .job import Job

BLOCK_STATE = ".blocks"  # per-block saliency of a run in progress, inside its partial directory
UNSEEN_POLICY = ("their input saw no calibration token (experts never routed to): z stays 0 and their masks are "
                 "cut by |W|, the ranking's second key")


def learn_in_memory(job: Job, model: nn.Module, config: PruneConfig) -> tuple[Saliency, list[dict] | dict]:
    """(saliency, per-block timings or the feedback report) of a model in memory."""
    if config.feedback == "full":
        return calibrate_full(job, model, config)
    return calibrate(job, model, config)


def learn_from_checkpoint(job: Job, config: PruneConfig, state_dir: str,
                          on_block: Callable[[int, Mapping[str, torch.Tensor]], None] | None,
                          report: Report) -> Saliency | None:
    """The saliency of the job's checkpoint (None for the sparsegpt metric), its timings in `report`."""
    if not config.has_saliency:
        return None
    if config.feedback == "full":  # the whole model, fine-tuned along the way; the output keeps the source
        model = load_model(job.checkpoint.model_dir, job.dtype, job.trust_remote_code)
        for name, param in model.named_parameters():
            check_finite(name, param)
        saliency, report.feedback = calibrate_full(job, model, config, restore=False)
    else:  # never the whole model: a meta-device skeleton, each block read from the shards in its turn
        saliency, report.blocks = calibrate(job, job.skeleton(), config, state_dir, on_block)
    saliency.metadata["source_sha256"] = job.checkpoint.content_sha256()  # `mask` refuses other weights
    if saliency.metadata.get("unseen"):
        report.unseen_matrices = {"matrices": saliency.metadata["unseen"], "policy": UNSEEN_POLICY}
    return saliency

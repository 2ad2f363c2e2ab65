"""`check_resume`: which changes between a checkpoint and the run resuming it in place are refused
(DeepSpeed would fail deep inside, or load the wrong thing) and which are fine. The refusals through
the trainer are catalogue entries (docs/ERRORS.md: checkpoint.resume_other_model / _layout)."""
import os
from types import SimpleNamespace

import pytest

from megams.checkpoint import CheckpointError
from megams.checkpoint.reshard import check_resume
from megams.config import dump_config, load_config
from tests.training.common import ROOT

VANILLA = os.path.join(ROOT, "configs", "tiny", "vanilla.yaml")


def _meta(zero=0, precision="fp32", dp=1, tp=1, pp=1, *model):
    cfg = load_config(VANILLA, list(model))
    return {"config": dump_config(cfg),
            "layout": {"world": dp * tp * pp, "dp": dp, "tp": tp, "pp": pp, "zero_stage": zero, "precision": precision}}


def _check(meta, *overrides, dp=1, tp=1, pp=1):
    cfg = load_config(VANILLA, list(overrides))
    check_resume(meta, cfg, SimpleNamespace(dp=dp, tp=tp, pp=pp), "RUN/checkpoints/step_00000010")


@pytest.mark.parametrize("meta,overrides,dp", [
    (_meta(), [], 1),
    (_meta(0, "fp32", 2), [], 4),                                   # ZeRO-0: every rank holds everything
    (_meta(0, "fp32"), ["training.precision=bf16"], 1),             # ZeRO-0 bf16 = autocast over fp32 weights
    (_meta(0, "fp32", 1, 1, 1, "model.dropout=0.1"), [], 1),       # dropout does not change the parameters
    (_meta(2, "bf16", 2), ["parallel.zero_stage=2", "training.precision=bf16"], 2),
])
def test_resumable(meta, overrides, dp):
    _check(meta, *overrides, dp=dp)


@pytest.mark.parametrize("meta,overrides,dp,message", [
    (_meta(), ["parallel.zero_stage=1"], 1, "saved with layout zero_stage=0, this run has zero_stage=1"),
    (_meta(2, "fp32", 2), ["parallel.zero_stage=2"], 4, "saved with layout dp=2, this run has dp=4"),
    (_meta(1, "bf16"), ["parallel.zero_stage=1"], 1, "saved with layout precision=bf16, this run has precision=fp32"),
    (_meta(0, "fp32", 1, 2), [], 1, "saved with layout tp=2, this run has tp=1"),
    (_meta(0, "fp32", 1, 1, 1, "model.n_layers=3"), [], 1, "a different model (model.n_layers=3 there, 4 here)"),
])
def test_refused(meta, overrides, dp, message):
    with pytest.raises(CheckpointError) as e:
        _check(meta, *overrides, dp=dp)
    assert str(e.value).startswith("checkpoint.resume: RUN/checkpoints/step_00000010: " + message)

"""Train -> checkpoint (any layout) -> convert -> load with torch alone: the logits are the training
model's, and tools/evaluate.py reproduces the run's validation loss.

Tolerances: fp32 runs compare fp32 logits (tensor parallelism reorders sums: 1e-4); bf16 runs train
bf16 weights (DeepSpeed bf16, ZeRO >= 1) or fp32 weights under bf16 autocast (ZeRO-0), so the
converted fp32 master weights are compared through a bf16 copy of the model (bf16 rounding: 0.1 on
logits of size ~5) and evaluated in the run's precision mode.
"""
import contextlib
import io
import json

import pytest
import torch

from tests.checkpoint.conftest import FACTORS, case_id, full_matrix, pairwise, tool

DEFAULT = [case_id(c) for c in pairwise(FACTORS)]
FULL = [case_id(c) for c in full_matrix()]


def _run(runs, name):
    if name not in runs:
        pytest.skip("pipeline parallelism is not in the trainer yet")
    run = runs[name]
    assert run.rc == 0
    return run


def _logits(run, torch_only):
    got = torch_only[case_id(run.case)]
    assert got["eval"]  # load_pretrained returns the model ready for inference
    ref = run.training_logits
    if run.case["precision"] == "fp32":
        torch.testing.assert_close(got["fp32"], ref, rtol=1e-4, atol=1e-4)
    else:
        mine = got["bf16"] if run.case["zero"] >= 1 else got["fp32"]
        assert (mine - ref).abs().max().item() < 0.1
        assert (got["fp32"] - ref).abs().mean().item() < 0.02


def _evaluate(run):
    args = [run.converted, "--data", "builtin", "--part", "valid", "--stride", str(64 + 1), "--max-windows", "4"]
    if run.case["precision"] == "bf16":
        args += ["--dtype", "bf16"] if run.case["zero"] >= 1 else ["--autocast-bf16"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert tool("evaluate").main(args) == 0
    result = json.loads(buf.getvalue())
    tol = 1e-5 if run.case["precision"] == "fp32" else 2e-2
    assert result["loss"] == pytest.approx(run.val_loss(), rel=tol, abs=tol)
    assert result["scored_tokens"] == 4 * 64 and result["bits_per_byte"] > 0


@pytest.mark.parametrize("name", DEFAULT)
def test_converted_model_gives_the_training_logits(default_runs, default_torch_only, name):
    _logits(_run(default_runs, name), default_torch_only)


@pytest.mark.parametrize("name", DEFAULT)
def test_evaluate_reproduces_the_validation_loss(default_runs, name):
    _evaluate(_run(default_runs, name))


def test_torch_only_load_never_imports_deepspeed(default_torch_only):
    assert default_torch_only["__deepspeed_imported__"] is False
    assert default_torch_only["__megams_modules__"] == []  # nor the trainer or the parallel layers


def test_conversion_reports_what_it_read_and_wrote(default_runs):
    run = next(r for r in default_runs.values() if r.case["tp"] == 2) if any(
        r.case["tp"] == 2 for r in default_runs.values()) else next(iter(default_runs.values()))
    out = run.convert_output
    assert f"read {run.ckpt} (step 2; layout dp={run.dp} tp={run.case['tp']}" in out
    assert "weights: " in out and f"wrote {run.converted}: " in out
    assert "config.json, tokenizer.json, export.json, README.md" in out
    export = json.load(open(f"{run.converted}/export.json"))
    assert export["source"]["step"] == 2 and export["validation"]["val_loss"] == run.val_loss()


@pytest.mark.full
@pytest.mark.parametrize("name", FULL)
def test_full_matrix_logits(full_runs, full_torch_only, name):
    _logits(_run(full_runs, name), full_torch_only)


@pytest.mark.full
@pytest.mark.parametrize("name", FULL)
def test_full_matrix_evaluate(full_runs, name):
    _evaluate(_run(full_runs, name))

"""DeepSpeed's own universal-checkpoint converter (`ds_to_universal`) reads megams checkpoints, thanks
to the `universal_checkpoint_info` megams records, and finds the same full tensors as megams' reader."""
import argparse
import contextlib
import io
import os

import pytest
import torch


def _universal(ckpt, out):
    from deepspeed.checkpoint import ds_to_universal
    args = argparse.Namespace(input_folder=ckpt, output_folder=out, num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=False)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)


def test_ds_to_universal_agrees_with_megams_reader(default_runs, tmp_path):
    from megams.checkpoint import read_checkpoint
    run = next((r for r in default_runs.values()
                if r.case["tp"] == 2 and r.case["pp"] == 1 and r.case["zero"] in (1, 2)), None)
    if run is None:
        pytest.skip("no TP=2 ZeRO-1/2 checkpoint in the default runs")
    out = str(tmp_path / "universal" / "step_00000002")
    _universal(run.ckpt, out)
    ours = read_checkpoint(run.ckpt, optimizer=True)
    for name, full in ours.params.items():
        uc = torch.load(os.path.join(out, "zero", name, "fp32.pt"), weights_only=False)
        assert torch.equal(uc["param"].reshape(full.shape), full), name
        avg = torch.load(os.path.join(out, "zero", name, "exp_avg.pt"), weights_only=False)["param"]
        assert torch.equal(avg.reshape(full.shape), ours.optimizer[name]["exp_avg"]), name

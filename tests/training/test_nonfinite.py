"""NaN/inf loss or gradient on any rank: the update is skipped on every rank (state unchanged),
or the run stops with exit code 4 after saving the last good state.

Every run is a real trainer (`main(argv)`) inside `run_ranks` processes; the NaN is injected by
wrapping megams.training.loss.lm_loss there (tests.training.common.inject_nonfinite)."""
import contextlib
import io
import os

import pytest
import torch

from megams.checkpoint import read_checkpoint
from megams.training.trainer import main
from tests.errors.catalogue import entry, outcome
from tests.helpers.multiproc import run_ranks
from tests.training.common import inject_nonfinite, read_metrics, tiny_args


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _ckpt(run_dir, name):
    return os.path.join(run_dir, "checkpoints", name)


def case_train(rank, world, run_dir, model, steps, nan_steps, kind, extra, nan_ranks=None):
    """A run with a NaN injected at `nan_steps`: (exit code, stdout, the `error:` lines)."""
    undo = inject_nonfinite(None, steps=set(nan_steps), grad_accum=4 // (2 * world), kind=kind, ranks=nan_ranks)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(tiny_args(model, run_dir, steps=steps, extra=extra))
    finally:
        undo()
    return rc, out.getvalue(), [line for line in err.getvalue().splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    base = tmp_path_factory.mktemp("nonfinite1")
    runs = {"skip": str(base / "skip"), "limit": str(base / "limit")}
    res = run_ranks(1, [
        (case_train, (runs["skip"], "bottom_up", 5, {3}, "loss",
                      ["checkpoint.interval=1", "checkpoint.keep_last=10", "logging.interval=1"])),
        (case_train, (runs["limit"], "vanilla", 6, {2, 3, 4, 5}, "grad", ["training.max_consecutive_nonfinite=2"])),
    ], timeout=300)
    return runs, {"skip": res[0][0], "limit": res[1][0]}


def test_skip_leaves_weights_and_moments_unchanged(one_rank):
    runs, res = one_rank
    run = runs["skip"]
    rc, out, errors = res["skip"]
    assert rc == 0 and not errors, errors
    assert ("[megams] non-finite loss and gradients on rank(s) 0 at step 3: update skipped (1 in a row, 1 in "
            "total; limit training.max_consecutive_nonfinite=5)") in out
    steps, _ = read_metrics(run)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert [r.get("skipped", False) for r in steps] == [False, False, True, False, False]
    assert steps[2]["nonfinite"] == "non-finite loss and gradients on rank(s) 0" and steps[2]["loss"] is None
    assert steps[-1]["skipped_steps"] == 1
    lrs = [r["lr"] for r in steps]  # a skipped update does not advance the LR schedule (as DeepSpeed's own skips)
    assert lrs[3] == lrs[2] != lrs[1] and lrs[4] != lrs[3]
    s2, s3, s4 = (read_checkpoint(_ckpt(run, f"step_0000000{i}"), optimizer=True) for i in (2, 3, 4))
    assert _same(s2.params, s3.params) and s2.adam_step == s3.adam_step == 2
    assert all(_same(s2.optimizer[n], s3.optimizer[n]) for n in s2.params)
    assert not _same(s3.params, s4.params) and s4.adam_step == 3
    assert s3.meta["nonfinite_skips"] == {"total": 1, "consecutive": 1}
    assert s4.meta["nonfinite_skips"] == {"total": 1, "consecutive": 0}


def test_runtime__nonfinite_repeated(one_rank):
    runs, res = one_rank
    run = runs["limit"]
    rc, out, errors = res["limit"]
    dump = _ckpt(run, "nonfinite_step_00000003")
    assert rc == 4 and errors == [
        f"error: non-finite gradients on rank(s) 0 at step 3 (2 steps in a row skipped "
        f"(training.max_consecutive_nonfinite=2)): stopped; the last good state (after step 2) is saved in {dump}"]
    entry("runtime.nonfinite_repeated").check(outcome(rc, errors, out), dump)
    good = read_checkpoint(dump)
    assert good.step == 2 and good.meta["stopped_at_step"] == 3
    assert good.meta["data"]["consumed_samples"] == 2 * 4  # the bad batch is not counted as consumed
    assert _same(good.params, read_checkpoint(_ckpt(run, "step_00000002")).params)
    with open(_ckpt(run, "latest")) as f:
        assert f.read() == "step_00000002"  # the dump is for inspection, never resumed from


def test_runtime__nonfinite_stop(tmp_path):
    """Rank 1 alone sees the NaN at step 3: both ranks stop there, exit code 4, one message."""
    loss_run, grad_run = str(tmp_path / "loss"), str(tmp_path / "grad")
    extra = ["parallel.zero_stage=1", "training.on_nonfinite=stop"]
    results = run_ranks(2, [(case_train, (loss_run, "vanilla", 5, {3}, "loss", extra, {1})),
                            (case_train, (grad_run, "vanilla", 5, {3}, "grad", extra, {1}))], timeout=300)
    # ZeRO-1's own gradient-norm check sees the NaN (after the reduction over data ranks)
    ds = "gradients (found by DeepSpeed's gradient-norm check)"
    for run, (r0, r1), what in [(loss_run, results[0], f"loss on rank(s) 1 and {ds}"), (grad_run, results[1], ds)]:
        dump = _ckpt(run, "nonfinite_step_00000003")
        assert r0[0] == r1[0] == 4, (r0, r1)
        assert r0[2] == r1[2] == [f"error: non-finite {what} at step 3 (training.on_nonfinite=stop): stopped; "
                                  f"the last good state (after step 2) is saved in {dump}"]
        entry("runtime.nonfinite_stop").check(outcome(r0[0], r0[2], r0[1]), dump)
        assert _same(read_checkpoint(dump).params, read_checkpoint(_ckpt(run, "step_00000002")).params)


# (zero stage, precision, pipeline): every pair of values of two factors appears (pipelines take ZeRO 0-1)
MATRIX = [(0, "fp32", 2), (1, "bf16", 2), (0, "bf16", 1), (2, "fp32", 1), (2, "bf16", 1), (3, "fp32", 1),
          (3, "bf16", 1), (1, "fp32", 1)]


def case_skip_matrix(rank, world, base):
    out = []
    for zero, precision, pp in MATRIX:
        run_dir = os.path.join(base, f"z{zero}-{precision}-pp{pp}")
        extra = [f"parallel.zero_stage={zero}", f"training.precision={precision}", f"parallel.pipeline={pp}",
                 "checkpoint.interval=1", "checkpoint.keep_last=10", "logging.interval=1"]
        undo = inject_nonfinite(None, steps={2}, grad_accum=4 // (2 * (world // pp)), kind="loss", ranks={1})
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                rc = main(tiny_args("bottom_up", run_dir, steps=4, extra=extra))
        finally:
            undo()
        out.append(rc)
    return out


def test_skip_across_zero_stages_precisions_and_pipelines(tmp_path):
    """A NaN loss on rank 1 at step 2 is skipped on every rank in every DeepSpeed path: the weights
    after step 2 are those after step 1, and training goes on."""
    codes = run_ranks(2, [(case_skip_matrix, (str(tmp_path),))], timeout=600)[0]
    assert codes == [[0] * len(MATRIX)] * 2, codes
    for zero, precision, pp in MATRIX:
        run_dir = str(tmp_path / f"z{zero}-{precision}-pp{pp}")
        steps, _ = read_metrics(run_dir)
        assert [r.get("skipped", False) for r in steps] == [False, True, False, False], (zero, precision, pp, steps)
        assert "non-finite loss on rank(s) 1" in steps[1]["nonfinite"], steps[1]
        s1, s2, s3 = (read_checkpoint(_ckpt(run_dir, f"step_0000000{i}")) for i in (1, 2, 3))
        assert _same(s1.params, s2.params), (zero, precision, pp)
        assert not _same(s2.params, s3.params), (zero, precision, pp)

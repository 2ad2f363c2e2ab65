"""Reliability: SIGKILL a 2-rank run at a random moment, rerun the same command, and the loss curve
must be the uninterrupted run's, every step exactly once and bit for bit (fp32 on CPU).

The job is `python launch/pretrain.py` started as two real processes with torchrun's variables
(tests/helpers/ranks_launch.py). SIGKILL is a node failure: nothing is flushed, no handler runs,
a checkpoint may be half written. The rerun must resume from the newest complete checkpoint,
drop the metrics logged after it and recompute those steps identically. Killing a single rank
must also end the other one (gloo reports the lost peer) instead of leaving it hung.
"""
import json
import os
import random
import re
import signal
import statistics
import time

import pytest

from megams.training.exit_codes import COMM_FAILURE
from tests.helpers.ranks_launch import RankJob, logged_steps
from tests.training.common import pretrain_argv

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "tiny", "vanilla.yaml")
WORLD = 2
MAX_STEPS = 12
CKPT_INTERVAL = 3
# ~0.1 s per step on one thread per rank: slow enough that the kill lands near the chosen step.
OVERRIDES = [f"training.max_steps={MAX_STEPS}", f"checkpoint.interval={CKPT_INTERVAL}", "logging.interval=1",
             "logging.progress_bar=false", "training.eval_interval=0", "training.eval_batches=2",
             "training.precision=fp32", "training.seed=1234", "parallel.zero_stage=1", "data.seq_len=128",
             "training.micro_batch_size=4", "training.global_batch_size=8"]
RUN_TIMEOUT = 180       # one whole run, start-up included (the first one may compile DeepSpeed's shm op)
SURVIVOR_TIMEOUT = 60   # a rank whose peer was SIGKILLed must have exited by then
RESUMED = re.compile(r"\[megams\] resumed from (\S+) at step (\d+)\b")

pytestmark = pytest.mark.slow


def train_args(run_dir):
    return pretrain_argv(CONFIG, OVERRIDES + [f"training.run_dir={run_dir}"])


def read_records(run_dir):
    """(steps, evals) of metrics.jsonl; a torn line fails here (a finished run never leaves one)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [r for r in recs if "loss" in r], [r for r in recs if "val_loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: per-step losses every interrupted run must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    run_dir = str(tmp / "run")
    with RankJob(train_args(run_dir), WORLD, tmp / "logs", name="uninterrupted run") as job:
        assert job.wait(RUN_TIMEOUT) == [0] * WORLD, job.tails()
    steps, evals = read_records(run_dir)
    assert [r["step"] for r in steps] == list(range(1, MAX_STEPS + 1)), job.tails()
    assert not RESUMED.search(job.output(0))
    return {"loss": {r["step"]: r["loss"] for r in steps}, "evals": evals,
            "step_time": statistics.median(r["step_time_s"] for r in steps)}


def expected_resume_steps(last_logged):
    """Checkpoints the rerun may resume from, given the newest step rank 0 logged before the kill.

    Rank 0 logs step s before that step's checkpoint, and the checkpoint of an earlier multiple of
    the interval was complete before step s began. So it is that multiple, or, when s itself is
    one, s (if its save finished before the kill) or the one before.
    Step 0 means no checkpoint: the rerun starts afresh.
    """
    base = last_logged - last_logged % CKPT_INTERVAL
    return {base} if last_logged % CKPT_INTERVAL else {base, base - CKPT_INTERVAL}


def kill_and_resume(tmp_path, reference, kill_step, delay, victims):
    """Run, SIGKILL `victims` `delay` s after `kill_step` is logged, rerun; returns what happened."""
    run_dir = str(tmp_path / "run")
    argv = train_args(run_dir)
    with RankJob(argv, WORLD, tmp_path / "killed", name="killed run") as job:
        job.wait_for_step(run_dir, kill_step, timeout=RUN_TIMEOUT)
        time.sleep(delay)
        for rank in victims:  # back to back: the whole node fails at once
            job.kill(signal.SIGKILL, rank=rank)
        killed_at = time.monotonic()
        codes = job.wait(SURVIVOR_TIMEOUT, why="a rank whose peer was SIGKILLed did not exit (hung in gloo?)")
        survivor_exit_s = time.monotonic() - killed_at
    assert 0 not in codes, f"the run ended before the kill (kill step {kill_step} too late):\n{job.tails()}"
    for rank in victims:
        assert codes[rank] == -signal.SIGKILL, job.tails()
    for rank in set(range(WORLD)) - set(victims):  # gloo reported the lost peer: "a rank vanished"
        assert codes[rank] == COMM_FAILURE, f"rank {rank} exit code {codes[rank]}:\n{job.tails()}"
    logged = logged_steps(run_dir)
    last = max(logged)
    assert kill_step <= last < MAX_STEPS

    with RankJob(argv, WORLD, tmp_path / "resumed", name="resumed run") as rerun:
        assert rerun.wait(RUN_TIMEOUT) == [0] * WORLD, rerun.tails()
    out = rerun.output(0)
    m = RESUMED.search(out)
    resumed_from = int(m.group(2)) if m else 0
    assert resumed_from in expected_resume_steps(last), (
        f"resumed from step {resumed_from}, rank 0 had logged step {last} when killed:\n{out[-3000:]}")
    if m:
        assert os.path.basename(m.group(1)) == f"step_{resumed_from:08d}"

    steps, evals = read_records(run_dir)
    assert [r["step"] for r in steps] == list(range(1, MAX_STEPS + 1)), (  # each step exactly once, in order
        f"resumed from step {resumed_from} after rank 0 logged step {last}")
    mismatched = {r["step"]: (r["loss"], reference["loss"][r["step"]]) for r in steps
                  if r["loss"] != reference["loss"][r["step"]]}
    assert not mismatched, f"(resumed, uninterrupted) loss differs at steps {mismatched}; resumed from {resumed_from}"
    assert [(e["step"], e["val_loss"]) for e in evals] == [(e["step"], e["val_loss"]) for e in reference["evals"]]

    ck = os.path.join(run_dir, "checkpoints")
    with open(os.path.join(ck, "latest")) as f:
        final = f.read().strip()
    assert final == f"step_{MAX_STEPS:08d}"
    with open(os.path.join(ck, final, "megams.json")) as f:
        assert json.load(f)["step"] == MAX_STEPS
    assert not [d for d in os.listdir(ck) if d.startswith("step_") and ".tmp" in d], os.listdir(ck)
    return {"last_logged": last, "resumed_from": resumed_from, "codes": codes, "survivor_exit_s": survivor_exit_s}


def random_kill(seed, reference):
    """A step after the first checkpoint that leaves the run 3 steps to go, and a random moment
    within the following step or checkpoint save (0 to 1.5 median steps after it is logged)."""
    rng = random.Random(seed)
    return rng.randint(CKPT_INTERVAL + 1, MAX_STEPS - 3), rng.uniform(0.0, 1.5) * reference["step_time"]


@pytest.mark.parametrize("seed", [0, 1, 2] + [pytest.param(s, marks=pytest.mark.full) for s in range(3, 11)])
def test_sigkill_every_rank_then_resume_is_exact(tmp_path, reference, seed):
    kill_step, delay = random_kill(seed, reference)
    got = kill_and_resume(tmp_path, reference, kill_step, delay, victims=[0, 1])
    print(f"[kill-resume] seed={seed} kill_step={kill_step} delay={delay:.3f}s "
          f"last_logged={got['last_logged']} resumed_from={got['resumed_from']}")


@pytest.mark.parametrize("victim,seed", [(1, 100), pytest.param(0, 101, marks=pytest.mark.full)])
def test_sigkill_one_rank_the_other_exits_then_resume_is_exact(tmp_path, reference, victim, seed):
    """One rank dies; its peer must fail out of its collective within SURVIVOR_TIMEOUT (not hang)."""
    kill_step, delay = random_kill(seed, reference)
    got = kill_and_resume(tmp_path, reference, kill_step, delay, victims=[victim])
    print(f"[kill-resume] victim=rank{victim} seed={seed} kill_step={kill_step} delay={delay:.3f}s "
          f"last_logged={got['last_logged']} resumed_from={got['resumed_from']} exit codes={got['codes']} "
          f"survivor exited {got['survivor_exit_s']:.2f}s after the kill")


def test_sigkill_before_the_first_checkpoint_restarts_from_scratch(tmp_path, reference):
    """Killed before any checkpoint: the rerun starts afresh and its metrics replace the killed run's."""
    got = kill_and_resume(tmp_path, reference, kill_step=1, delay=0.0, victims=[0, 1])
    assert got["resumed_from"] == 0


@pytest.mark.parametrize("sig,victims", [(signal.SIGTERM, [1]),
                                         pytest.param(signal.SIGUSR1, [0, 1], marks=pytest.mark.full)])
def test_stop_signal_every_rank_stops_at_one_step_then_resume_is_exact(tmp_path, reference, sig, victims):
    """Preemption: the signal reaches some ranks; all agree on one step, save it, exit 75; the rerun
    resumes from exactly that step and the curve is the uninterrupted one."""
    from megams.training.exit_codes import PREEMPTED
    run_dir = str(tmp_path / "run")
    argv = train_args(run_dir)
    with RankJob(argv, WORLD, tmp_path / "stopped", name="preempted run") as job:
        job.wait_for_step(run_dir, 4, timeout=RUN_TIMEOUT)
        for rank in victims:
            job.kill(sig, rank=rank)
        codes = job.wait(RUN_TIMEOUT, why="ranks did not stop after the stop signal")
        out = job.output(0)
    assert codes == [PREEMPTED] * WORLD, job.tails()
    m = re.search(r"\[megams\] preemption signal: stopped at step (\d+), checkpoint (\S+)", out)
    assert m, out[-3000:]
    stopped = int(m.group(1))
    assert 4 <= stopped < MAX_STEPS and os.path.basename(m.group(2)) == f"step_{stopped:08d}"
    assert logged_steps(run_dir)[-1] == stopped
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        assert f.read() == f"step_{stopped:08d}"
    with RankJob(argv, WORLD, tmp_path / "resumed", name="resumed run") as rerun:
        assert rerun.wait(RUN_TIMEOUT) == [0] * WORLD, rerun.tails()
    assert re.search(rf"\[megams\] resumed from \S+ at step {stopped}\b", rerun.output(0))
    steps, _ = read_records(run_dir)
    assert [r["step"] for r in steps] == list(range(1, MAX_STEPS + 1))
    assert {r["step"]: r["loss"] for r in steps} == reference["loss"]

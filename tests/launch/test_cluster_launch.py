"""The shipped launch scripts on real software: SLURM (sbatch + srun; SIGTERM mid-run -> requeue ->
resume; one deepspeed launcher per node with SIGUSR1 -> requeue -> resume), mpirun and the
deepspeed launcher.

Every run is the same short 2-rank pretraining of configs/tiny/vanilla.yaml (same seed,
OMP_NUM_THREADS=1) and must log exactly the loss curve of the reference run, which is the
`deepspeed --num_gpus 2` run, made once per session.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.multiproc import free_port
from tests.helpers.ranks_launch import ENV as RANK_ENV
from tests.training.common import pretrain_argv

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = sys.executable
CONFIG = os.path.join(ROOT, "configs", "tiny", "vanilla.yaml")
MAX_STEPS = 12
OVERRIDES = [f"training.max_steps={MAX_STEPS}", "checkpoint.interval=4", "logging.interval=1",
             "logging.progress_bar=false", "training.eval_interval=0", "training.eval_batches=2"]
RUN_TIMEOUT = 180
ENV = {**RANK_ENV, "MEGAMS_PYTHON": PY}

pytestmark = pytest.mark.slow


def train_args(run_dir):
    return pretrain_argv(CONFIG, OVERRIDES + [f"training.run_dir={run_dir}"])


def loss_curve(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


def run(cmd, env=None, timeout=RUN_TIMEOUT):
    """Run a launcher in its own session; on timeout kill the whole tree (launchers fork)."""
    p = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **ENV, **(env or {})}, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"{' '.join(cmd[:3])} ... still running after {timeout}s:\n{out[-4000:]}")
    return p.returncode, out


def started_line(out, launcher):
    """The one line rank 0 prints about its launcher."""
    lines = [ln for ln in out.splitlines() if ln.startswith(f"[megams] launcher={launcher}")]
    assert lines, f"no '[megams] launcher={launcher}' line in:\n{out[-4000:]}"
    return lines[0]


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """`deepspeed --num_gpus 2` of the tiny run: the curve every other launcher must reproduce."""
    run_dir = str(tmp_path_factory.mktemp("ds") / "run")
    deepspeed = os.path.join(os.path.dirname(PY), "deepspeed")
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py", *train_args(run_dir)]
    rc, out = run(cmd)
    assert rc == 0, out[-4000:]
    curve = loss_curve(run_dir)
    assert [s for s, _ in curve] == list(range(1, MAX_STEPS + 1)), out[-4000:]
    return {"curve": curve, "out": out, "cmd": cmd}


def test_deepspeed_launcher(reference):
    line = started_line(reference["out"], "deepspeed")
    assert " world=2 nodes=1 ranks/node=2 rank=0 local_rank=0 master=127.0.0.1:" in line
    assert "OMP_NUM_THREADS=1" in line


@pytest.mark.mpi
def test_mpirun(mpirun, reference, tmp_path):
    run_dir = str(tmp_path / "run")
    rc, out = run([os.path.join(ROOT, "launch", "mpi", "pretrain_mpirun.sh"), "-n", "2", "--", *train_args(run_dir)])
    assert rc == 0, out[-4000:]
    assert out.startswith("[megams-mpirun] mpirun -np 2 --bind-to none --allow-run-as-root --mca btl self,vader "
                          "--mca oob_tcp_if_include lo")
    line = started_line(out, "mpirun")
    assert "(OpenMPI) world=2 nodes=1 ranks/node=2 rank=0 local_rank=0 master=127.0.0.1:" in line
    assert loss_curve(run_dir) == reference["curve"]


# -- SLURM ----------------------------------------------------------------------------------------
def sbatch(slurm, script, run_dir, *sbatch_args, env=None):
    os.makedirs(run_dir, exist_ok=True)
    cmd = ["sbatch", "--parsable", f"--output={run_dir}/slurm-%j.out", *sbatch_args,
           os.path.join(ROOT, "launch", "slurm", script), *train_args(run_dir)]
    p = slurm.run(cmd, cwd=ROOT, env={**ENV, **(env or {})})
    return int(p.stdout.strip().split(";")[0])


def job_output(run_dir, job):
    with open(os.path.join(run_dir, f"slurm-{job}.out")) as f:
        return f.read()


@pytest.mark.slurm
def test_sbatch_srun(slurm, reference, tmp_path):
    run_dir = str(tmp_path / "run")
    job = sbatch(slurm, "pretrain.sbatch", run_dir, "--ntasks=2", "--ntasks-per-node=2")
    state = slurm.wait_job(job, timeout=RUN_TIMEOUT)
    out = job_output(run_dir, job)
    assert state == "COMPLETED", out[-4000:]
    assert f"[megams-sbatch] job {job} restart 0: 1 node(s) {slurm.node}, 2 task(s)" in out
    line = started_line(out, "srun")
    assert f"(SLURM job {job} step 0) world=2 nodes=1 ranks/node=2 rank=0 local_rank=0 master=127.0.0.1:" in line
    assert loss_curve(run_dir) == reference["curve"]


def signal_mid_run(slurm, job, run_dir, sig):
    """Wait for the first logged step, send `sig` to the job's steps, wait for the job to end.

    Returns the job's output and the step every rank stopped at.
    """
    deadline = time.monotonic() + RUN_TIMEOUT
    while not loss_curve(run_dir):  # training has started
        assert time.monotonic() < deadline, f"job {job} never logged a step:\n{slurm.logs()}"
        assert slurm.job_field(job, "JobState") in ("PENDING", "RUNNING"), job_output(run_dir, job)[-4000:]
        time.sleep(0.05)
    slurm.run(["scancel", f"--signal={sig}", str(job)])
    signalled_after = loss_curve(run_dir)[-1][0]
    state = slurm.wait_job(job, timeout=RUN_TIMEOUT)
    out = job_output(run_dir, job)
    assert state == "COMPLETED", out[-4000:]
    assert slurm.job_field(job, "Restarts") == "1", (
        f"the job was not requeued (SIG{sig} sent after step {signalled_after} of {MAX_STEPS}):\n{out[-4000:]}")
    m = re.search(r"\[megams\] preemption signal: stopped at step (\d+)", out)
    assert m, out[-4000:]
    stopped = int(m.group(1))
    assert signalled_after <= stopped < MAX_STEPS
    assert f"[megams] stopped on SIG{sig}; requeueing: " in out and f"scontrol requeue {job}" in out
    assert re.search(rf"\[megams\] resumed from \S+ at step {stopped}\b", out), out[-4000:]
    assert f"[megams-sbatch] job {job} restart 1:" in out
    return out, stopped


@pytest.mark.slurm
def test_sbatch_preempted_requeues_and_resumes(slurm, reference, tmp_path):
    """SIGTERM (preemption, scancel) mid-run: every rank stops at one step, checkpoints, and rank 0
    runs `scontrol requeue`; the requeued job (same id) resumes from that checkpoint and the loss
    curve continues exactly."""
    run_dir = str(tmp_path / "run")
    job = sbatch(slurm, "pretrain.sbatch", run_dir, "--ntasks=2", "--ntasks-per-node=2")
    out, _ = signal_mid_run(slurm, job, run_dir, "TERM")
    assert f"(SLURM job {job} step 0 restart 1) world=2" in out
    assert loss_curve(run_dir) == reference["curve"]


@pytest.mark.slurm
def test_sbatch_deepspeed_per_node_time_limit_signal(slurm, reference, tmp_path):
    """launch/slurm/pretrain_deepspeed.sbatch: one deepspeed launcher per node from a generated
    hostfile; SIGUSR1 (what `--signal=USR1@120` sends before the time limit) reaches the launchers
    too, which must survive it while the ranks checkpoint and requeue."""
    run_dir = str(tmp_path / "run")
    hostfile = str(tmp_path / "hostfile")
    job = sbatch(slurm, "pretrain_deepspeed.sbatch", run_dir, "--ntasks-per-node=1", "--cpus-per-task=2",
                 env={"RANKS_PER_NODE": "2", "HOSTFILE": hostfile})
    out, _ = signal_mid_run(slurm, job, run_dir, "USR1")
    with open(hostfile) as f:
        assert f.read() == f"{slurm.node} slots=2\n"
    assert f"1 node(s) x 2 rank(s), hostfile {hostfile}: {slurm.node} slots=2 master 127.0.0.1:" in out
    line = started_line(out, "deepspeed")
    assert f"(SLURM job {job}) world=2 nodes=1 ranks/node=2 rank=0 local_rank=0 master=127.0.0.1:" in line
    assert loss_curve(run_dir) == reference["curve"]

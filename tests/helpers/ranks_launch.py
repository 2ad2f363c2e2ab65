"""Start N real `python launch/pretrain.py ARGV` processes as one job, the way torchrun would.

    with RankJob(argv, world_size=2, log_dir=tmp_path / "logs") as job:
        job.wait_for_step(run_dir, 5)        # rank 0 has logged step >= 5, every rank still alive
        job.kill(signal.SIGKILL)             # all ranks (or job.kill(sig, rank=1))
        codes = job.wait(timeout=60)         # exit codes; negative = killed by that signal

Each rank gets RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1 and a free
MASTER_PORT, OMP_NUM_THREADS=1, DS_ACCELERATOR=cpu and the project's TORCH_EXTENSIONS_DIR. Every
rank runs in its own session (its own process group), so a signal reaches exactly that rank and
whatever it forked; its stdout and stderr go to LOG_DIR/rank<R>.log.

Nothing outlives the job: leaving the `with` block (or `close()`) SIGKILLs and reaps every rank
still running, and on Linux each rank also gets SIGKILL if the test process itself dies.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Optional, Sequence

import pytest

from tests.helpers.multiproc import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRETRAIN = os.path.join(ROOT, "launch", "pretrain.py")
ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1",
       "PYTHONWARNINGS": "ignore::FutureWarning",
       "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".venv", "torch_extensions"))}
# Variables of other launchers: a test run inside an sbatch/mpirun job must not leak them to the ranks.
_FOREIGN_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "TORCHELASTIC_")
_FOREIGN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "CROSS_RANK", "CROSS_SIZE",
            "MASTER_ADDR", "MASTER_PORT")


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL me when the test process dies (Linux prctl)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def logged_steps(run_dir: str) -> list[int]:
    """Steps with a loss in RUN_DIR/metrics.jsonl, in file order; a torn last line is ignored."""
    path = os.path.join(run_dir, "metrics.jsonl")
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return []
    steps = []
    for line in text.split("\n")[:-1]:  # the piece after the last newline may be half written
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "loss" in rec:
            steps.append(rec["step"])
    return steps


class RankJob:
    def __init__(self, argv: Sequence[str], world_size: int, log_dir, env: Optional[dict] = None,
                 script: str = PRETRAIN, name: str = "job"):
        self.name = name
        self.world_size = world_size
        self.log_dir = str(log_dir)
        os.makedirs(self.log_dir, exist_ok=True)
        port = free_port()
        base = {k: v for k, v in os.environ.items()
                if k not in _FOREIGN and not k.startswith(_FOREIGN_PREFIXES)}
        self.procs: list[subprocess.Popen] = []
        try:
            for rank in range(world_size):
                rank_env = {**base, **ENV, **(env or {}), "RANK": str(rank), "WORLD_SIZE": str(world_size),
                            "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size),
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
                with open(self.log_path(rank), "wb") as log:
                    self.procs.append(subprocess.Popen(
                        [sys.executable, script, *argv], cwd=ROOT, env=rank_env, stdin=subprocess.DEVNULL,
                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None))
        except BaseException:
            self.close()
            raise

    # -- context manager: never leak a rank ---------------------------------------------------------
    def __enter__(self) -> "RankJob":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """SIGKILL every rank still running (with its process group) and reap it."""
        for p in self.procs:
            if p.poll() is None:
                self._signal(p, signal.SIGKILL)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:  # unkillable (D state): nothing more we can do
                pass

    # -- state and output ------------------------------------------------------------------------------
    def log_path(self, rank: int) -> str:
        return os.path.join(self.log_dir, f"rank{rank}.log")

    def output(self, rank: int = 0) -> str:
        with open(self.log_path(rank), errors="replace") as f:
            return f.read()

    def tails(self, chars: int = 3000) -> str:
        parts = []
        for r, p in enumerate(self.procs):
            parts.append(f"--- {self.name} rank {r} (exit code {p.poll()}), {self.log_path(r)} ---\n"
                         f"{self.output(r)[-chars:]}")
        return "\n".join(parts)

    def alive(self) -> list[int]:
        return [r for r, p in enumerate(self.procs) if p.poll() is None]

    def returncodes(self) -> list[Optional[int]]:
        return [p.poll() for p in self.procs]

    # -- control ---------------------------------------------------------------------------------------
    @staticmethod
    def _signal(p: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(p.pid, sig)  # pid == pgid: start_new_session
        except ProcessLookupError:
            pass

    def kill(self, sig: int = signal.SIGKILL, rank: Optional[int] = None) -> None:
        """Send `sig` to one rank (its whole process group) or, back to back, to every rank."""
        for r, p in enumerate(self.procs):
            if rank is None or r == rank:
                self._signal(p, sig)

    def _fail(self, what: str) -> None:
        """Kill the job and fail the test with every rank's output (exit codes as they were)."""
        tails = self.tails()
        self.close()
        pytest.fail(f"{self.name}: {what}\n{tails}", pytrace=False)

    def wait(self, timeout: float, ranks: Optional[Sequence[int]] = None, why: str = "") -> list[Optional[int]]:
        """Exit codes of all ranks once `ranks` (default: all) have exited. On timeout, kill the
        whole job and fail the test (saying `why`) with the tail of every rank's output."""
        deadline = time.monotonic() + timeout
        watched = list(range(self.world_size)) if ranks is None else list(ranks)
        for r in watched:
            try:
                self.procs[r].wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                hung = [w for w in watched if self.procs[w].poll() is None]
                self._fail(f"ranks {hung} still running after {timeout:.0f}s (killed). {why}")
        return self.returncodes()

    def wait_for_step(self, run_dir: str, step: int, timeout: float = 120, poll: float = 0.01) -> int:
        """Poll RUN_DIR/metrics.jsonl until rank 0 has logged a step >= `step`; returns the newest
        logged step. Fails (after killing the job) if a rank exits first or on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            logged = logged_steps(run_dir)
            if logged and max(logged) >= step:
                return max(logged)
            if len(self.alive()) < self.world_size:
                self._fail(f"a rank exited before step {step} was logged (logged: {logged})")
            if time.monotonic() > deadline:
                self._fail(f"step {step} not logged after {timeout:.0f}s (logged: {logged})")
            time.sleep(poll)

"""Stop cleanly when the scheduler says so: every rank at the same step, checkpoint, requeue.

SLURM announces the end of a job with a signal: SIGTERM on preemption, `scancel` or a node
drain (then SIGKILL after KillWait), or SIGUSR1 ahead of the time limit when the job asked for
it (`#SBATCH --signal=USR1@120`). The signal reaches each rank at a different moment, so the
handler only sets a flag; once per optimizer step every rank all-reduces (MAX) its flag, and
all of them see the same answer at the same step. The trainer then saves a checkpoint, calls
`requeue()` and exits 75 (`exit_codes.PREEMPTED`); the requeued job resumes from that checkpoint.

A second stop signal while the first is being handled exits at once with 128 + its number (the
user or the scheduler insists; the last complete checkpoint stays `latest`). The same signal
delivered twice within `DUPLICATE_WINDOW_S` counts once: srun and a forwarding launcher (the
deepspeed launcher under SLURM) can each deliver one announcement.

    handler = PreemptionHandler()
    handler.install()
    for step in ...:
        ...optimizer step...
        if handler.stop_requested():      # collective: every rank calls it every step
            save_checkpoint(step)
            handler.requeue()             # collective barrier, then rank 0: scontrol requeue
            return 0
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
DUPLICATE_WINDOW_S = 2.0


class PreemptionHandler:
    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.received: int | None = None  # the first stop signal this rank got
        self._received_at = 0.0
        self._previous: dict = {}

    # -- signal side: set a flag (a second, distinct signal: exit now) ---------------------------
    def _on_signal(self, signum, frame) -> None:
        now = time.monotonic()
        if self.received is None:
            self.received, self._received_at = signum, now
            return
        if signum == self.received and now - self._received_at < DUPLICATE_WINDOW_S:
            return  # the same announcement delivered twice
        name = signal.Signals(signum).name
        os.write(2, f"error: a second stop signal ({name}) while stopping: exited at once; the last complete "
                    f"checkpoint stays latest\n".encode())
        os._exit(128 + signum)

    def install(self) -> "PreemptionHandler":
        """Catch SIGTERM and SIGUSR1 (main thread only, as Python requires)."""
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    # -- collective side ------------------------------------------------------------------------
    def stop_requested(self) -> bool:
        """True on every rank iff any rank got a stop signal. Call it on every rank, every step."""
        local = self.received is not None
        import torch
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return local
        from megams.distributed import comm
        flag = comm.comm_tensor([1 if local else 0], dtype=torch.int32)  # on the device the backend reduces
        comm.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "none"

    def requeue(self) -> bool:
        """After the checkpoint: put this SLURM batch job back in the queue (rank 0 only).

        A barrier first, so no rank is still writing when SLURM kills the job's steps.
        Outside SLURM, or when `scontrol` is missing, it only says so. Returns True when the
        job was requeued.
        """
        import torch.distributed as dist
        rank = 0
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            rank = dist.get_rank()
        if rank != 0:
            return False
        job = os.environ.get("SLURM_JOB_ID")
        why = f"stopped on {self.signal_name()}"
        if not job:
            print(f"[megams] {why}; not under SLURM, not requeueing: rerun the same command to resume",
                  flush=True)
            return False
        scontrol = shutil.which("scontrol")
        if scontrol is None:
            print(f"[megams] {why}; scontrol not found, not requeueing SLURM job {job}", flush=True)
            return False
        cmd = [scontrol, "requeue", job]
        print(f"[megams] {why}; requeueing: {' '.join(cmd)}", flush=True)
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            print(f"[megams] scontrol requeue {job} failed: {e}", file=sys.stderr, flush=True)
            return False
        if p.returncode:
            print(f"[megams] scontrol requeue {job} failed ({p.returncode}): {(p.stderr or p.stdout).strip()}",
                  file=sys.stderr, flush=True)
            return False
        return True

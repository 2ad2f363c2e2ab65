"""Who stopped progressing: a per-rank progress board in the rendezvous store, read when a
collective fails.

Every collective of a run has a timeout (`training.collective_timeout_s`, handed to
`init_process_group`). When one expires — a rank hung, or its process died and the connection
dropped — the rank that notices gets an exception from deep inside the backend that says nothing
about *which* rank is at fault. So every rank records its progress once per step in the store the
ranks rendezvoused through (TCPStore on the master; a key per rank: step, time, host, pid), and
`describe_failure` reads the board and names the ranks that are behind:

    board = ProgressBoard.from_default_group()
    board.report(step)                      # once per step, every rank
    ...
    except Exception as e:
        if is_comm_failure(e): print("error: " + describe_failure(e, board, step)); os._exit(5)

Reading the board has its own short timeout: when the store's host (rank 0) is the one that is
frozen, the message says so instead of hanging too.
"""
from __future__ import annotations

import json
import os
import socket
import time
from datetime import timedelta
from typing import Dict, Optional

KEY = "megams/progress/{rank}"
READ_TIMEOUT_S = 5.0

COMM_FAILURE_TEXT = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe",
                     "connection refused", "socket closed", "read error", "write error", "ncclremoteerror",
                     "nccl communicator was aborted", "process group watchdog", "gloo", "peer")


def is_comm_failure(err: BaseException) -> bool:
    """An exception from a collective that failed (timed out, or a peer vanished)."""
    import torch.distributed as dist
    if isinstance(err, getattr(dist, "DistBackendError", ())) or isinstance(err, getattr(dist, "DistError", ())):
        return True
    if isinstance(err, (RuntimeError, ConnectionError)):
        text = str(err).lower()
        return any(t in text for t in COMM_FAILURE_TEXT)
    return False


class ProgressBoard:
    def __init__(self, store, rank: int, world: int):
        self.store, self.rank, self.world = store, rank, world
        self.host, self.pid = socket.gethostname(), os.getpid()

    @classmethod
    def from_default_group(cls) -> Optional["ProgressBoard"]:
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            return None
        try:
            from torch.distributed import distributed_c10d as c10d
            store = c10d._get_default_store()
        except (AttributeError, RuntimeError, ValueError):
            return None
        return cls(store, dist.get_rank(), dist.get_world_size())

    def report(self, step: int, phase: str = "step") -> None:
        value = json.dumps({"step": step, "phase": phase, "t": time.time(), "host": self.host, "pid": self.pid})
        try:
            self.store.set(KEY.format(rank=self.rank), value)
        except Exception:  # noqa: BLE001 - the board is a diagnostic aid; never fail a step over it
            pass

    def read(self) -> Dict[int, dict]:
        """{rank: last report} of every rank that reported; raises if the store is unreachable."""
        self.store.set_timeout(timedelta(seconds=READ_TIMEOUT_S))
        out = {}
        for r in range(self.world):
            key = KEY.format(rank=r)
            if self.store.check([key]):
                out[r] = json.loads(self.store.get(key))
        return out


def _ranks(ranks) -> str:
    ranks = sorted(ranks)
    if len(ranks) > 8:
        return f"{', '.join(map(str, ranks[:8]))}, ... ({len(ranks)} ranks)"
    return ", ".join(map(str, ranks))


def describe_failure(err: BaseException, board: Optional[ProgressBoard], step: int, timeout_s: float) -> str:
    """One line: what failed, and which ranks stopped progressing (from the board)."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    head = (f"a collective failed at step {step + 1} (timeout {timeout_s:g} s; training.collective_timeout_s): "
            f"{first}")
    if board is None:
        return head
    try:
        seen = board.read()
    except Exception:  # noqa: BLE001
        who = "rank 0" if board.rank != 0 else "this rank"
        return (f"{head}; the progress board in the rendezvous store (hosted by {who}) is unreachable: rank 0 "
                f"itself is probably hung or gone")
    now = time.time()
    missing = [r for r in range(board.world) if r not in seen]
    steps = {r: rec["step"] for r, rec in seen.items()}
    lagging = missing[:]
    if steps:
        top = max(steps.values())
        lagging += [r for r, s in steps.items() if s < top]
    if not lagging:
        return f"{head}; every rank reported step {max(steps.values()) if steps else '?'}: a rank failed inside it"
    parts = []
    for r in sorted(lagging)[:8]:
        rec = seen.get(r)
        if rec is None:
            parts.append(f"rank {r} never reported")
        else:
            parts.append(f"rank {r} ({rec['host']} pid {rec['pid']}) last finished step {rec['step']} "
                         f"{now - rec['t']:.0f} s ago")
    ahead = [r for r in steps if r not in lagging]
    tail = f"; ranks {_ranks(ahead)} reached step {max(steps.values())}" if ahead else ""
    return f"{head}; stopped progressing: {'; '.join(parts)}{tail} — hung or dead"

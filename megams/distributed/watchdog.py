"""Who stopped progressing: a per-rank progress board in the rendezvous store, read when a
collective fails.

Every collective of a run has a timeout (`training.collective_timeout_s`, handed to
`init_process_group`). When one expires — a rank hung, or its process died and the connection
dropped — the rank that notices gets an exception from deep inside the backend that says nothing
about *which* rank is at fault. So every rank records its progress once per step in the store the
ranks rendezvoused through (TCPStore on the master; a key per rank: step, time, host, pid), and a
daemon thread refreshes a heartbeat key every few seconds. `describe_failure` reads the board and
names the ranks that are behind (a lower step) or silent (no heartbeat for several periods: the
process is frozen or dead — a rank stuck inside the same step as the others is found this way):

    board = ProgressBoard.from_default_group()
    board.start_heartbeat(interval_s)       # once
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
BEAT = "megams/heartbeat/{rank}"
READ_TIMEOUT_S = 5.0
STALE_BEATS = 3  # a heartbeat older than this many periods: the rank is frozen or dead

COMM_FAILURE_TEXT = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe",
                     "connection refused", "socket closed", "read error", "write error", "ncclremoteerror",
                     "nccl communicator was aborted", "process group watchdog", "gloo", "peer")


def set_group_timeout(timeout: timedelta) -> None:
    """Make every process group created from now on use `timeout`. `init_process_group(timeout=)`
    only sets the world group's; groups made later by `new_group()` without a timeout — DeepSpeed's
    data-parallel group, where the gradient all-reduce runs — would get torch's 30-minute default,
    and a hung rank would keep the others waiting that long."""
    from torch.distributed import distributed_c10d as c10d
    c10d.default_pg_timeout = timeout
    if hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = timeout


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
        self.interval_s: Optional[float] = None
        self._stop = None

    def start_heartbeat(self, interval_s: float) -> None:
        import threading
        self.interval_s = interval_s
        self._stop = threading.Event()

        def beat():
            while True:
                try:
                    self.store.set(BEAT.format(rank=self.rank), repr(time.time()))
                except Exception:  # noqa: BLE001 - the store is gone: nothing left to tell
                    return
                if self._stop.wait(interval_s):
                    return
        threading.Thread(target=beat, name="megams-heartbeat", daemon=True).start()

    def stop_heartbeat(self) -> None:
        if self._stop is not None:
            self._stop.set()

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
            key, beat = KEY.format(rank=r), BEAT.format(rank=r)
            if self.store.check([key]):
                out[r] = json.loads(self.store.get(key))
            if self.store.check([beat]):
                out.setdefault(r, {})["beat"] = float(self.store.get(beat))
        return out


def _ranks(ranks) -> str:
    ranks = sorted(ranks)
    if len(ranks) > 8:
        return f"{', '.join(map(str, ranks[:8]))}, ... ({len(ranks)} ranks)"
    return ", ".join(map(str, ranks))


def describe_failure(err: BaseException, board: Optional[ProgressBoard], step: int, timeout_s: float) -> str:
    """One line: what failed, and which ranks stopped progressing (from the board)."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if len(first) > 200:
        first = first[:200].rsplit(" ", 1)[0] + " ..."
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
    steps = {r: rec["step"] for r, rec in seen.items() if "step" in rec}
    top = max(steps.values()) if steps else None
    stale_after = STALE_BEATS * board.interval_s if board.interval_s else None

    def silent(r):
        beat = seen.get(r, {}).get("beat")
        return r != board.rank and stale_after is not None and beat is not None and now - beat > stale_after

    def gone(r):  # a rank on this host whose process no longer exists
        rec = seen.get(r, {})
        return r != board.rank and rec.get("host") == board.host and "pid" in rec and not _alive(rec["pid"])
    lagging = sorted(r for r in range(board.world) if r not in steps or steps[r] < top or silent(r) or gone(r))
    if not lagging:
        return f"{head}; every rank reported step {top if steps else '?'} and is alive: a rank failed inside it"
    parts = []
    for r in lagging[:8]:
        rec = seen.get(r, {})
        if "step" not in rec:
            text = f"rank {r} never reported"
        else:
            text = (f"rank {r} ({rec['host']} pid {rec['pid']}) last finished step {rec['step']} "
                    f"{now - rec['t']:.0f} s ago")
        if gone(r):
            text += ", its process has exited"
        elif silent(r):
            text += f", no heartbeat for {now - rec['beat']:.0f} s"
        parts.append(text)
    ahead = [r for r in steps if r not in lagging]
    tail = f"; rank{'s' if len(ahead) > 1 else ''} {_ranks(ahead)} reached step {top}" if ahead else ""
    return f"{head}; stopped progressing: {'; '.join(parts)}{tail} — hung or dead"


def _alive(pid: int) -> bool:
    """Whether process `pid` (on this host) still runs: a zombie (exited, not yet reaped) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True

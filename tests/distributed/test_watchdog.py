"""A hung or dead rank ends the run with a message naming it (megams.distributed.watchdog)."""
import json
import re
import signal
import time

import pytest
import torch.distributed as dist

from megams.distributed.watchdog import BEAT, KEY, ProgressBoard, describe_failure, is_comm_failure
from tests.errors.catalogue import entry, outcome
from tests.helpers.ranks_launch import RankJob
from tests.training.common import tiny_args


def _board(world, reports, beats=None, rank=0):
    store = dist.HashStore()
    for r, (step, age) in reports.items():
        store.set(KEY.format(rank=r), json.dumps({"step": step, "phase": "step", "t": time.time() - age,
                                                  "host": "node7", "pid": 1000 + r}))
    for r, age in (beats or {}).items():
        store.set(BEAT.format(rank=r), repr(time.time() - age))
    board = ProgressBoard(store, rank, world)
    board.interval_s = 2.0
    return board


def test_the_ranks_behind_are_named():
    err = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 20000ms for recv operation\nmore")
    board = _board(4, {0: (5, 1), 1: (4, 31), 3: (5, 1)})
    assert describe_failure(err, board, step=5, timeout_s=20) == (
        "a collective failed at step 6 (timeout 20 s; training.collective_timeout_s): [gloo/transport/tcp/"
        "unbound_buffer.cc:81] Timed out waiting 20000ms for recv operation; stopped progressing: rank 1 (node7 "
        "pid 1001) last finished step 4 31 s ago; rank 2 never reported; ranks 0, 3 reached step 5 — hung or dead")


def test_every_rank_at_the_same_step_and_alive():
    board = _board(2, {0: (3, 1), 1: (3, 2)}, beats={0: 1, 1: 1})
    msg = describe_failure(RuntimeError("Connection closed by peer"), board, step=3, timeout_s=600)
    assert msg.endswith("Connection closed by peer; every rank reported step 3 and is alive: a rank failed inside it")


def test_a_silent_rank_at_the_same_step_is_named():
    """Frozen right after finishing the step the others finished too: only its heartbeat tells."""
    board = _board(3, {0: (3, 20), 1: (3, 20), 2: (3, 20)}, beats={0: 1, 1: 19, 2: 1})
    msg = describe_failure(RuntimeError("Timed out"), board, step=3, timeout_s=20)
    assert msg.endswith("stopped progressing: rank 1 (node7 pid 1001) last finished step 3 20 s ago, no heartbeat "
                        "for 19 s; ranks 0, 2 reached step 3 — hung or dead")


def test_an_unreachable_store_is_said_not_waited_on():
    class Gone:
        def set_timeout(self, t):
            pass

        def check(self, keys):
            raise RuntimeError("connection refused")
    msg = describe_failure(RuntimeError("timed out"), ProgressBoard(Gone(), 1, 2), step=0, timeout_s=5)
    assert msg.endswith("the progress board in the rendezvous store (hosted by rank 0) is unreachable: rank 0 "
                        "itself is probably hung or gone")


@pytest.mark.parametrize("err,expected", [
    (RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:5555"), True),
    (RuntimeError("Timed out waiting 1000ms for send operation to complete"), True),
    (RuntimeError("shape mismatch in matmul"), False),
    (ValueError("timed out"), False),
])
def test_comm_failures_are_recognised(err, expected):
    assert is_comm_failure(err) is expected


TIMEOUT = 15


def test_runtime__collective_timeout(tmp_path):
    """Rank 1 is frozen (SIGSTOP) mid-run: rank 0's next collective times out, and rank 0 exits 5
    naming rank 1, its pid and the last step it finished. The last checkpoint is intact."""
    run_dir = str(tmp_path / "run")
    argv = tiny_args("vanilla", run_dir, steps=200, extra=["logging.interval=1", "checkpoint.interval=2",
                                                           f"training.collective_timeout_s={TIMEOUT}"])
    with RankJob(argv, world_size=2, log_dir=tmp_path / "logs") as job:
        job.wait_for_step(run_dir, 3)
        job.kill(signal.SIGSTOP, rank=1)
        t0 = time.monotonic()
        code = job.wait(timeout=TIMEOUT + 60, ranks=[0], why="rank 0 should give up on the frozen rank")[0]
        waited = time.monotonic() - t0
        out = job.output(0)
        pid1 = job.procs[1].pid
    assert code == 5, job.tails()
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out, out[-3000:]
    m = re.fullmatch(rf"error: a collective failed at step (\d+) \(timeout {TIMEOUT} s; training.collective_timeout_s\)"
                     rf": .*; stopped progressing: rank 1 \(\S+ pid {pid1}\) last finished step (\d+) \d+ s ago, "
                     rf"no heartbeat for (\d+) s; rank 0 reached step (\d+) — hung or dead", errors[0])
    assert m, errors[0]
    failed_at, last1, silent, top = map(int, m.groups())
    assert last1 <= top == failed_at - 1 and silent >= TIMEOUT - 2 and waited < TIMEOUT + 30
    entry("runtime.collective_timeout").check(outcome(code, errors), f"pid {pid1}")
    from megams.checkpoint.manifest import verify
    from megams.training import checkpoint as ckpt
    good = ckpt.latest_checkpoint(run_dir)
    verify(good, ckpt.read_meta(good))


def test_runtime__rank_lost(tmp_path):
    """Rank 1's process is killed mid-run: rank 0 learns at once (the connection drops) and exits 5
    naming rank 1 and saying its process has exited."""
    run_dir = str(tmp_path / "run")
    argv = tiny_args("vanilla", run_dir, steps=200, extra=["logging.interval=1"])
    with RankJob(argv, world_size=2, log_dir=tmp_path / "logs") as job:
        job.wait_for_step(run_dir, 3)
        pid1 = job.procs[1].pid
        job.kill(signal.SIGKILL, rank=1)
        code = job.wait(timeout=60, ranks=[0], why="rank 0 should notice its peer is gone")[0]
        out = job.output(0)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert code == 5 and len(errors) == 1 and "Traceback" not in out, job.tails()
    assert re.search(rf"stopped progressing: rank 1 \(\S+ pid {pid1}\) last finished step \d+ \d+ s ago, its process "
                     rf"has exited", errors[0]), errors[0]
    entry("runtime.rank_lost").check(outcome(code, errors), f"pid {pid1}")

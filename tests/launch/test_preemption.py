"""PreemptionHandler: the flag, the all-ranks agreement, and `scontrol requeue`."""
import os
import signal
import stat
import time

import pytest

from megams.training.preemption import PreemptionHandler
from tests.helpers.multiproc import run_ranks


@pytest.fixture
def handler():
    h = PreemptionHandler().install()
    yield h
    h.uninstall()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_sets_the_flag_only(handler, sig):
    assert handler.stop_requested() is False
    os.kill(os.getpid(), sig)
    time.sleep(0.01)
    assert handler.stop_requested() is True
    assert handler.signal_name() == sig.name


def test_uninstall_restores_previous_handlers():
    before = signal.getsignal(signal.SIGTERM)
    h = PreemptionHandler().install()
    assert signal.getsignal(signal.SIGTERM) == h._on_signal
    h.uninstall()
    assert signal.getsignal(signal.SIGTERM) == before


def test_requeue_outside_slurm_only_says_so(handler, monkeypatch, capsys):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    os.kill(os.getpid(), signal.SIGTERM)
    assert handler.requeue() is False
    assert capsys.readouterr().out == ("[megams] stopped on SIGTERM; not under SLURM, not requeueing: "
                                       "rerun the same command to resume\n")


def _fake_scontrol(tmp_path, rc=0):
    log = tmp_path / "calls"
    exe = tmp_path / "scontrol"
    exe.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\necho 'scontrol: error: boom' >&2\nexit {rc}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return log


def test_requeue_under_slurm_runs_scontrol(handler, monkeypatch, tmp_path, capsys):
    log = _fake_scontrol(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    os.kill(os.getpid(), signal.SIGUSR1)
    assert handler.requeue() is True
    assert log.read_text() == "requeue 1234\n"
    assert capsys.readouterr().out == f"[megams] stopped on SIGUSR1; requeueing: {tmp_path}/scontrol requeue 1234\n"


def test_requeue_failure_is_reported(handler, monkeypatch, tmp_path, capsys):
    _fake_scontrol(tmp_path, rc=1)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    assert handler.requeue() is False
    assert capsys.readouterr().err == "[megams] scontrol requeue 99 failed (1): scontrol: error: boom\n"


def case_agree(rank, world_size, signal_rank, signal_step):
    """Only `signal_rank` is signalled (at `signal_step`); every rank must stop at that step."""
    h = PreemptionHandler().install()
    stopped_at = None
    for step in range(1, 6):
        if rank == signal_rank and step == signal_step:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
        if h.stop_requested():
            stopped_at = step
            break
    h.uninstall()
    return stopped_at, h.received is not None


def case_no_signal(rank, world_size):
    h = PreemptionHandler().install()
    out = [h.stop_requested() for _ in range(3)]
    h.uninstall()
    return out


def test_all_ranks_agree_on_the_stop_step():
    agree, quiet = run_ranks(2, [(case_agree, (1, 3)), (case_no_signal, ())], timeout=120)
    assert agree == [(3, False), (3, True)]
    assert quiet == [[False] * 3, [False] * 3]


SECOND_SIGNAL = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
from megams.training.preemption import PreemptionHandler
h = PreemptionHandler().install()
os.kill(os.getpid(), signal.SIGTERM)
time.sleep({gap})
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.5)
print("still running", h.signal_name(), flush=True)
"""


def _second_signal(gap):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.run([sys.executable, "-c", SECOND_SIGNAL.format(root=root, gap=gap)],
                          capture_output=True, text=True, timeout=60)


def test_runtime__second_signal():
    """A second SIGTERM while stopping (2.1 s after the first): exit 128+15 at once, one error line."""
    from tests.errors.catalogue import entry, outcome
    p = _second_signal(2.1)
    assert p.returncode == 128 + signal.SIGTERM and "still running" not in p.stdout, (p.returncode, p.stdout)
    lines = p.stderr.strip().splitlines()
    assert lines == ["error: a second stop signal (SIGTERM) while stopping: exited at once; the last complete "
                     "checkpoint stays latest"]
    entry("runtime.second_signal").check(outcome(p.returncode, lines), "SIGTERM")


def test_the_same_signal_delivered_twice_at_once_counts_once():
    p = _second_signal(0.05)
    assert p.returncode == 0 and p.stdout == "still running SIGTERM\n" and p.stderr == ""

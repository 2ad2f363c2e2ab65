"""tools/plan_memory.py: the issue's 512-rank command, --json, --build-rank, bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "plan_memory.py")
SCALE = os.path.join(ROOT, "configs", "scale", "bottom_up_13b.yaml")
TINY = os.path.join(ROOT, "configs", "tiny", "bottom_up.yaml")


def _run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, env=env, timeout=300)


def test_13b_on_512_ranks_under_a_minute():
    t0 = time.monotonic()
    r = _run("--config", SCALE, "--world", "512", "--set", "parallel.tensor=8", "--set", "parallel.pipeline=8")
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert took < 60
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 8  # one role per pipeline stage (its 8 tensor ranks alike)
    assert "world 512 = dp 8 x pp 8 x tp 8" in r.stdout and "fits" in r.stdout


def test_json_and_build_rank():
    r = _run("--config", TINY, "--world", "8", "--set", "parallel.tensor=2", "--set", "parallel.pipeline=2",
             "--set", "parallel.zero_stage=1", "--json", "--build-rank", "5", "--device-memory", "0.05")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert (plan["dp"], plan["pp"], plan["tp"]) == (2, 2, 2) and len(plan["roles"]) == 2
    b = plan["build_rank"]
    assert (b["stage"], b["tp_rank"]) == (0, 1)  # rank 5 = dp 1, pp 0, tp 1
    assert b["measured_elements"] == b["planned_elements"] == plan["roles"][0]["params"]
    assert plan["fits"] == (plan["peak"] <= 0.05 * 2 ** 30)
    for role in plan["roles"]:
        assert role["total"] == role["weights"] + role["grads"] + role["optimizer"] + role["activations"] + \
            role["transient"] + sum(role["comm"].values())


@pytest.mark.parametrize("args, message", [
    (["--world", "6", "--set", "parallel.tensor=4"], "error: world size 6 is not divisible by parallel.tensor=4"),
    (["--world", "4", "--build-rank", "4"], "error: --build-rank 4 is outside the world of 4 ranks (0..3)"),
    (["--world", "4", "--device-memory", "0"], "error: --device-memory must be > 0 GiB, got 0.0"),
])
def test_bad_input(args, message):
    r = _run("--config", TINY, *args)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(message), r.stderr


def test_build_rank_0_of_13b_within_the_rss_limit():
    """The issue's bound: peak RSS < 1.3 x the rank's measured shard bytes + 2 GiB (~15 s, ~3 GiB)."""
    r = _run("--config", SCALE, "--world", "512", "--set", "parallel.tensor=8", "--set", "parallel.pipeline=8",
             "--build-rank", "0", "--json")
    assert r.returncode == 0, r.stderr
    b = json.loads(r.stdout)["build_rank"]
    assert b["measured_elements"] == b["planned_elements"]
    assert b["peak_rss_bytes"] < b["rss_limit_bytes"]

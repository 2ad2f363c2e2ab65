"""Resharding: a run started (`checkpoint.load_from`) from a checkpoint of another layout continues
the loss curve of the uninterrupted run (fp32): weights, AdamW moments and step, LR schedule and data
position all carried.

    U   uninterrupted: TP=2,PP=2 (TP=2,PP=1 until the trainer has pipelines), ZeRO-1, 6 steps
    R1  TP=1,PP=1, 2 data ranks, ZeRO-3, from U's step 2, stops at step 4 (exit_interval)
    R2  TP=2,PP=1, ZeRO-0, from R1's step 4, runs to step 6
    P   TP=2, ZeRO-2, from the plain-torch export of U's step 2 (weights only: step 0, fresh AdamW)
So the chain changes TP, PP, DP and the ZeRO stage at every hop.
"""
import os

import pytest
import torch

from tests.checkpoint.conftest import pipeline_in_trainer, tool
from tests.checkpoint.ranks import train
from tests.helpers.multiproc import run_ranks
from tests.training.common import losses, tiny_args

STEPS = 6


def _args(run_dir, cache, extra):
    return tiny_args("bottom_up", run_dir=run_dir, steps=STEPS,
                     extra=["model.vocab_size=300", "training.eval_batches=1", f"data.cache_dir={cache}",
                            "checkpoint.interval=2", "checkpoint.keep_last=3"] + extra)


def _convert_on_rank0(rank, world, src, dst):
    if rank == 0:
        assert tool("convert_checkpoint").main([src, dst]) == 0


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reshard")
    cache = str(tmp / "cache")
    d = {k: str(tmp / k) for k in ("U", "R1", "R2", "P")}
    ck = lambda run, step: os.path.join(d[run], "checkpoints", f"step_{step:08d}")  # noqa: E731
    pp = 2 if pipeline_in_trainer() else 1
    u = (train, (_args(d["U"], cache, ["parallel.tensor=2", f"parallel.pipeline={pp}", "parallel.zero_stage=1"]),))
    rest = [
        (train, (_args(d["R1"], cache, ["parallel.zero_stage=3", f"checkpoint.load_from={ck('U', 2)}",
                                        "training.exit_interval=4"]),)),
        (train, (_args(d["R2"], cache, ["parallel.tensor=2", "parallel.zero_stage=0",
                                        f"checkpoint.load_from={ck('R1', 4)}"]),)),
        (_convert_on_rank0, (ck("U", 2), str(tmp / "plain"))),
        (train, (_args(d["P"], cache, ["parallel.tensor=2", "parallel.zero_stage=2", "optimizer.lr=1e-9",
                                       f"checkpoint.load_from={tmp / 'plain'}", "training.max_steps=1"]),)),
    ]
    env = {"OMP_NUM_THREADS": "1"}
    if pp == 2:
        rcs = run_ranks(4, [u], timeout=900, env=env) + run_ranks(2, rest, timeout=900, env=env)
    else:
        rcs = run_ranks(2, [u] + rest, timeout=900, env=env)
    return d, ck, str(tmp / "plain"), rcs, pp


def test_chain_ran(chain):
    _, _, _, rcs, _ = chain
    assert all(rc in (0, None) for per_rank in rcs for rc in per_rank)  # None: the conversion case


def test_reshard_chain_continues_the_uninterrupted_loss_curve(chain):
    d, _, _, _, _ = chain
    u, r1, r2 = losses(d["U"]), losses(d["R1"]), losses(d["R2"])
    assert len(u) == 6 and len(r1) == 2 and len(r2) == 2
    assert r1 == pytest.approx(u[2:4], rel=1e-5, abs=1e-5)
    assert r2 == pytest.approx(u[4:6], rel=1e-5, abs=1e-5)
    assert u[-1] < u[0]


def test_resharded_checkpoints_hold_the_same_model(chain):
    """The final checkpoints of U (TP=2[,PP=2], ZeRO-1) and R2 (TP=2, ZeRO-0) convert to the same weights."""
    from megams.checkpoint import read_checkpoint
    d, _, _, _, _ = chain
    a, b = read_checkpoint(d["U"], optimizer=True), read_checkpoint(d["R2"], optimizer=True)
    assert a.step == b.step == STEPS and a.adam_step == b.adam_step == STEPS
    for name in a.params:
        torch.testing.assert_close(b.params[name], a.params[name], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b.optimizer[name]["exp_avg"], a.optimizer[name]["exp_avg"], rtol=1e-3, atol=1e-6)


def test_start_from_a_plain_torch_directory(chain):
    """Weights only: step 0 and a fresh optimizer; with lr=1e-9 one step leaves the weights as loaded."""
    from megams.checkpoint import load_pretrained, read_checkpoint
    d, _, plain, _, _ = chain
    after = read_checkpoint(d["P"], optimizer=True)
    assert after.step == 1 and after.adam_step == 1  # started at step 0
    model = load_pretrained(plain)
    for name, p in model.named_parameters():
        torch.testing.assert_close(after.params[name], p.detach(), rtol=0, atol=1e-6)

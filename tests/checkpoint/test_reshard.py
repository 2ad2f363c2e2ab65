"""Resharding: a run started (`checkpoint.load_from`) from a checkpoint of another layout continues
the loss curve of the uninterrupted run (fp32): weights, AdamW moments and step, LR schedule and data
position all carried.

    U   uninterrupted: TP=2,PP=2 (TP=2,PP=1 until the trainer has pipelines), ZeRO-1, 6 steps
    R1  TP=1,PP=1, 2 data ranks, ZeRO-3, from U's step 2, stops at step 4 (exit_interval)
    R2  TP=2,PP=1, ZeRO-0, from R1's step 4, runs to step 6
    P   TP=2, ZeRO-2, from the plain-torch export of U's step 2 (weights only: step 0, fresh AdamW)
    R3  TP=1,PP=2, ZeRO-1, from U's step 2 (tp2*pp2 -> tp1*pp2), stops at step 4
    R4  TP=2,PP=1, ZeRO-2, from R3's step 4 (pp2 -> tp2), runs to step 6
So the chain changes TP, PP, DP and the ZeRO stage at every hop. Every rank reads only its own pieces
of the source (megams.checkpoint.sharded); `test_each_rank_reads_its_share_of_a_real_checkpoint`
checks that accounting on the real files.
"""
import json
import math
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
    d = {k: str(tmp / k) for k in ("U", "R1", "R2", "P", "R3", "R4")}
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
    if pp == 2:
        rest += [
            (train, (_args(d["R3"], cache, ["parallel.pipeline=2", "parallel.zero_stage=1",
                                            f"checkpoint.load_from={ck('U', 2)}", "training.exit_interval=4"]),)),
            (train, (_args(d["R4"], cache, ["parallel.tensor=2", "parallel.zero_stage=2",
                                            f"checkpoint.load_from={ck('R3', 4)}"]),)),
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


def test_pipeline_hops_continue_the_loss_curve(chain):
    """tp2*pp2 -> tp1*pp2 (R3), then pp2 -> tp2 (R4)."""
    d, _, _, _, pp = chain
    if pp == 1:
        pytest.skip("pipeline parallelism is not in the trainer yet")
    u, r3, r4 = losses(d["U"]), losses(d["R3"]), losses(d["R4"])
    assert r3 == pytest.approx(u[2:4], rel=1e-5, abs=1e-5)
    assert r4 == pytest.approx(u[4:6], rel=1e-5, abs=1e-5)


def _unpadded(plain_shape, local_shape, dim, tp_rank):
    if dim is None:
        return math.prod(plain_shape) * 4
    lo = local_shape[dim] * tp_rank
    rows = max(0, min(lo + local_shape[dim], plain_shape[dim]) - lo)
    return rows * math.prod(n for i, n in enumerate(plain_shape) if i != dim) * 4


def test_each_rank_reads_its_share_of_a_real_checkpoint(chain):
    """U's step 2 (tp2*pp2 ZeRO-1, 4 gloo ranks) read rank by rank for the layouts of R1 (dp2 ZeRO-3),
    R2 (tp2 ZeRO-0) and R3 (tp1*pp2): each piece equals the slice of the full tensor, a rank copies
    out of the files no more than twice its share (row-parallel slices span their rows) and
    opens only the files of the source stages that hold its parameters."""
    from megams.checkpoint import read_checkpoint
    from megams.checkpoint.reshard import local_piece, read_piece
    from megams.checkpoint.sharded import open_checkpoint
    d, ck, _, _, pp = chain
    source = ck("U", 2)
    full = read_checkpoint(source, optimizer=True)
    src_record = full.meta["parameters"]
    stage_of = {}
    for r in src_record["mp_ranks"]:
        for _, plain, _, _, _ in r["params"]:
            stage_of.setdefault(src_record["tied"].get(plain, plain), r["pp"])
    targets = ["R1", "R2"] + (["R3"] if pp == 2 else [])
    for run in targets:
        ckpt = sorted(p for p in os.listdir(os.path.join(d[run], "checkpoints")) if p.startswith("step_"))[0]
        record = json.load(open(os.path.join(d[run], "checkpoints", ckpt, "megams.json")))["parameters"]
        tp = max(r["tp"] for r in record["mp_ranks"]) + 1
        for rec in record["mp_ranks"]:
            src = open_checkpoint(source)
            share, stages = 0, set()
            for _, plain, shape, dim, _ in rec["params"]:
                plain = record["tied"].get(plain, plain)
                stages.add(stage_of[plain])
                for kind in ("param", "exp_avg", "exp_avg_sq"):
                    got = read_piece(src, plain, kind, shape, dim, rec["tp"])
                    ref = full.params[plain] if kind == "param" else full.optimizer[plain][kind]
                    assert torch.equal(got, local_piece(ref, shape, dim, rec["tp"], tp)), (run, plain, kind)
                    share += _unpadded(list(ref.shape), shape, dim, rec["tp"])
            assert src.stats.read <= 2 * share, (run, rec["mp_rank"])
            src_tp = max(r["tp"] for r in src_record["mp_ranks"]) + 1
            allowed = {m for m in range(len(src_record["mp_ranks"])) if m // src_tp in stages}
            opened = {int(f.split("mp_rank_")[1][:2]) for f in src.stats.files if "mp_rank_" in f}
            assert opened <= allowed, (run, rec["mp_rank"], sorted(opened), sorted(allowed))


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

"""Training through `launch/pretrain.py`'s trainer with tensor parallelism: the loss curve of the tiny
bottom-up model with tp=2, tp=2 + sequence parallelism (ZeRO-2) and tp=2 x dp=2 (ZeRO-1, ZeRO-3) follows
the single-process curve (fp32, same seed; grad clipping active, so the mpu's gradient norm must
count replicated parameters once). A shortened version of the 50-step run in docs/PARALLELISM.md.
"""
import pytest

from tests.helpers.multiproc import run_ranks
from tests.training.common import read_metrics, tiny_args

STEPS = 6


def _train(rank, world, argv):
    from megams.training.trainer import main
    return main(argv)


def _args(run_dir, *sets):
    return tiny_args("bottom_up", run_dir=str(run_dir), steps=STEPS,
                     extra=["checkpoint.interval=0", "optimizer.grad_clip=0.5", *sets])


@pytest.fixture(scope="module")
def curves(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp_train")
    layouts = {"single": (1, []), "tp2": (2, ["parallel.tensor=2"]),
               "tp2_sp": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.zero_stage=2"]),
               "tp2_dp2": (4, ["parallel.tensor=2", "parallel.zero_stage=1"]),
               "tp2_dp2_zero3": (4, ["parallel.tensor=2", "parallel.zero_stage=3"])}
    by_world = {}
    for name, (world, sets) in layouts.items():
        by_world.setdefault(world, []).append((name, (_train, (_args(tmp / name, *sets),))))
    out = {}
    for world, runs in by_world.items():
        rcs = run_ranks(world, [case for _, case in runs], timeout=300)
        for (name, _), rc in zip(runs, rcs):
            assert all(r == 0 for r in rc), (name, rc)
            out[name] = read_metrics(str(tmp / name))
    return out


@pytest.mark.parametrize("layout", ["tp2", "tp2_sp", "tp2_dp2", "tp2_dp2_zero3"])
def test_loss_curve_matches_single_process(curves, layout):
    (ref, ref_eval), (got, got_eval) = curves["single"], curves[layout]
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in ref], rel=1e-4, abs=1e-5), key
    assert got_eval[-1]["val_loss"] == pytest.approx(ref_eval[-1]["val_loss"], rel=1e-4)
    assert ref[-1]["loss"] < ref[0]["loss"]
    assert max(r["grad_norm"] for r in ref) > 0.5  # clipping was active

"""logging.comm_timing: a tensor-parallel run logs the seconds its collectives took (megams' and
DeepSpeed's), per rank; off, the records carry nothing of it and DeepSpeed's comms logger stays off."""
import pytest

from tests.helpers.multiproc import run_ranks
from tests.training.common import read_metrics, tiny_args


def _train(rank, world, argv):
    from megams.training.trainer import main
    rc = main(argv)
    import deepspeed.comm.comm as dscomm
    from megams.distributed import comm
    return rc, dscomm.comms_logger.enabled, comm._timer is not None


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("comm_timing")
    on, off = str(tmp / "on"), str(tmp / "off")
    extra = ["parallel.tensor=2", "checkpoint.interval=0"]
    rcs = run_ranks(2, [(_train, (tiny_args(run_dir=on, steps=3, extra=extra + ["logging.comm_timing=true"]),)),
                        (_train, (tiny_args(run_dir=off, steps=3, extra=extra),))], timeout=240)
    return on, off, rcs


def test_timed_run_logs_comm_seconds_below_the_step_time(tp_runs):
    on, _, rcs = tp_runs
    assert [r[0] for r in rcs[0]] == [0, 0]
    steps, _ = read_metrics(on)
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert 0 < r["comm_s"] < r["step_time_s"]
        ops = r["comm_ops"]
        tp = ops["all_reduce@2"]  # megams' tensor-parallel mappings, over the pair
        assert tp["calls"] > 0 and tp["s"] > 0 and tp["wire_bytes"] == tp["bytes"] > 0  # 2(n-1)/n = 1
        assert ops["all_reduce@1"]["wire_bytes"] == 0  # the loss mean over one data rank
        grads = ops["ds:all_reduce@1"]  # DeepSpeed's gradient reduction over one data rank: no traffic
        assert grads["calls"] > 0 and grads["bytes"] > 1000 and grads["wire_bytes"] == 0
        assert ops["ds:all_reduce@2"]["calls"] > 0  # its gradient norm over the tensor pair
        assert r["comm_s"] == pytest.approx(sum(v["s"] for v in ops.values()))
        assert len(r["ranks"]) == 2
        for rank in r["ranks"]:
            assert 0 < rank["comm_s"] < rank["step_time_s"] and rank["peak_mem_bytes"] > 0
        assert r["ranks"][0]["comm_s"] == r["comm_s"]


def test_untimed_run_logs_no_comm_fields_and_leaves_the_loggers_off(tp_runs):
    _, off, rcs = tp_runs
    assert [r[0] for r in rcs[1]] == [0, 0]
    assert all(not ds_on and not megams_on for _, ds_on, megams_on in rcs[0] + rcs[1])  # closed at shutdown
    steps, _ = read_metrics(off)
    assert len(steps) == 3
    assert not any({"comm_s", "comm_ops", "ranks"} & set(r) for r in steps)

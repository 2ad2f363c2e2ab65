"""The 8-GPU node model of the scaling study: ring wire bytes, per-rank predicted step, a layout's row."""
import pytest

from megams.bench import scaling
from megams.training.comm_timing import wire_bytes

NODE = {"gpus": 8, "link_GBps": 100.0, "latency_us": 10.0, "gpu_tflops": 100.0}


def test_ring_wire_bytes():
    assert wire_bytes("all_reduce", 1000, 2) == 1000
    assert wire_bytes("all_reduce", 1000, 4) == 1500
    assert wire_bytes("all_reduce", 1000, 8) == 1750
    assert wire_bytes("all_gather_into_tensor", 1000, 4) == 750
    assert wire_bytes("reduce_scatter_tensor", 1000, 2) == 500
    assert wire_bytes("send", 1000, 2) == wire_bytes("recv", 1000, 2) == 1000
    assert wire_bytes("all_reduce", 1000, 1) == 0 and wire_bytes("barrier", 0, 4) == 0


OPS = {"all_reduce@2": {"calls": 10, "s": 0.1, "bytes": 2e6, "wire_bytes": 2e6},       # tensor parallel
       "ds:all_reduce@2": {"calls": 2, "s": 0.1, "bytes": 1e8, "wire_bytes": 1e8},     # data parallel (dp=2)
       "ds:send@2": {"calls": 4, "s": 0.1, "bytes": 4e6, "wire_bytes": 4e6},           # point-to-point
       "ds:all_reduce@1": {"calls": 3, "s": 0.1, "bytes": 5e9, "wire_bytes": 0.0}}     # a group of one: free


def test_predicted_step_as_measured():
    p = scaling.predict_step(OPS, flops_per_rank=2e12, node=NODE, dp=2)
    comm = 16 * 10e-6 + (2e6 + 1e8 + 4e6) / 100e9  # 16 calls in groups of 2, 106 MB at 100 GB/s
    assert p["comm_s"] == pytest.approx(comm)
    assert p["compute_s"] == pytest.approx(2e12 / 100e12)
    assert p["share"] == pytest.approx(comm / (comm + 0.02))
    assert p["wire_bytes"] == pytest.approx(106e6)


def test_node_filled_by_data_parallel_replicas():
    p = scaling.predict_step(OPS, flops_per_rank=2e12, node=NODE, dp=2, dp_to=8)
    # only DeepSpeed's data-parallel collective is re-costed: 2(8-1)/8 of its 100 MB; sends stay
    assert p["wire_bytes"] == pytest.approx(2e6 + 1.75e8 + 4e6)
    assert p["comm_s"] == pytest.approx(16 * 10e-6 + (2e6 + 1.75e8 + 4e6) / 100e9)
    # dp = 1: the data-parallel group is the group of one; filled to 4 replicas it all-reduces 2 x 3/4
    q = scaling.predict_step(OPS, flops_per_rank=0.0, node=NODE, dp=1, dp_to=4)
    assert q["wire_bytes"] == pytest.approx(2e6 + 1e8 + 4e6 + 1.5 * 5e9)
    assert q["share"] == 1.0


def test_layout_row_from_metrics_records():
    def rec(step, comm0, comm1, mem1):
        ranks = [{"comm_s": comm0, "step_time_s": 0.5, "peak_mem_bytes": 100, "comm_ops": OPS},
                 {"comm_s": comm1, "step_time_s": 0.5, "peak_mem_bytes": mem1, "comm_ops": OPS}]
        return {"step": step, "tokens_per_s": 1000.0, "step_time_s": 0.5, "tflops": 4.0, "comm_s": comm0,
                "ranks": ranks}
    recs = [rec(1, 0.4, 0.4, 50)] + [rec(s, 0.1, 0.2, 300 if s == 5 else 200) for s in range(2, 7)]
    row = scaling.summarize(recs, dp=2, tp=1, pp=1, node=NODE)
    assert row["peak_rss_per_rank_bytes"] == [100, 300] and row["peak_rss_max_bytes"] == 300
    assert row["comm_s_per_rank"] == [0.1, 0.2] and row["comm_s"] == 0.2  # warm-up steps 1-3 left out
    assert row["comm_share_per_rank"] == [pytest.approx(0.2), pytest.approx(0.4)]
    assert row["flops_per_rank_step"] == pytest.approx(2e12)  # 4 TFLOP/s x 0.5 s
    assert row["node_filled_layout"] == "dp8tp1pp1"
    assert row["node_same"] == scaling.predict_step(OPS, 2e12, NODE, dp=2)
    assert row["node_filled"] == scaling.predict_step(OPS, 2e12, NODE, dp=2, dp_to=8)

"""ParallelDims: the rank layout (pure arithmetic, any world size), the process groups built on 4
real ranks, the DeepSpeed mpu / topology views of the same layout, and the error messages."""
import pytest
import torch
import torch.distributed as dist

from megams.config import Config, ConfigError, ModelConfig
from megams.parallel.dims import (ParallelDims, build_parallel_dims, coords_rank, layout_groups, padded_vocab,
                                  rank_coords)
from tests.helpers.multiproc import run_ranks


# layout, without processes ---------------------------------------------------------------------
def test_rank_order_is_megatron_tp_adjacent():
    # rank = dp * (pp * tp) + pp * tp + tp
    assert [rank_coords(r, tp=2, pp=2) for r in range(8)] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]


@pytest.mark.parametrize("world,tp,pp", [(8, 2, 2), (16, 2, 4), (24, 4, 3), (12, 1, 3), (6, 6, 1)])
def test_layout_round_trips_and_partitions(world, tp, pp):
    dp = world // (tp * pp)
    for r in range(world):
        assert coords_rank(*rank_coords(r, tp, pp), tp=tp, pp=pp) == r
    groups = layout_groups(world, tp, pp)
    sizes = {"tensor": tp, "pipeline": pp, "data": dp, "model": tp * pp}
    for kind, gs in groups.items():
        assert sorted(r for g in gs for r in g) == list(range(world)), kind  # a partition of the world
        assert {len(g) for g in gs} == {sizes[kind]}
    for r in range(world):
        d, p, t = rank_coords(r, tp, pp)
        dims = ParallelDims(world, tp, pp, rank=r)
        assert (dims.dp_rank, dims.pp_rank, dims.tp_rank) == (d, p, t)
        assert dims.group_ranks["tensor"] == [coords_rank(d, p, i, tp, pp) for i in range(tp)]
        assert dims.group_ranks["pipeline"] == [coords_rank(d, i, t, tp, pp) for i in range(pp)]
        assert dims.group_ranks["data"] == [coords_rank(i, p, t, tp, pp) for i in range(dp)]


def test_docstring_example_world8():
    dims = ParallelDims(8, tp=2, pp=2, rank=5)
    assert (dims.dp_size, dims.pp_size, dims.tp_size) == (2, 2, 2)
    assert (dims.dp_rank, dims.pp_rank, dims.tp_rank) == (1, 0, 1)
    assert dims.group_ranks == {"tensor": [4, 5], "pipeline": [5, 7], "data": [1, 5], "model": [4, 5, 6, 7]}
    mpu = dims.mpu
    assert (mpu.get_model_parallel_rank(), mpu.get_model_parallel_world_size()) == (1, 4)
    assert (mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_src_rank()) == (1, 4)
    assert (mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()) == (1, 2)
    assert mpu.get_data_parallel_group_ranks() == [1, 5]
    assert (mpu.get_pipeline_model_parallel_rank(), mpu.get_pipeline_model_parallel_world_size()) == (0, 2)
    # absent on purpose: these switch DeepSpeed to Ulysses sequence parallelism / older aliases
    assert not any(hasattr(mpu, n) for n in ("initialize_sequence_parallel", "get_sequence_parallel_world_size",
                                              "get_slice_parallel_rank"))


def test_deepspeed_topology_has_the_same_layout():
    dims = ParallelDims(24, tp=2, pp=3)
    topo = dims.topology()
    for r in range(24):
        d, p, t = rank_coords(r, 2, 3)
        assert topo.get_rank(data=d, pipe=p, model=t) == r


def test_padded_vocab():
    assert [padded_vocab(256, tp) for tp in (1, 2, 4, 8)] == [256] * 4
    assert [padded_vocab(1000, tp) for tp in (1, 2, 4, 8, 128)] == [1024] * 5  # layout-independent
    assert padded_vocab(257, 2) == 384
    assert padded_vocab(1, 1) == 128
    assert padded_vocab(256, 3) == 384  # tp not dividing 128: a multiple of lcm(128, 3)
    assert padded_vocab(50257, 8) == 50304


# error messages --------------------------------------------------------------------------------
def test_world_not_divisible():
    with pytest.raises(ConfigError) as e:
        ParallelDims(6, tp=4, pp=1)
    assert str(e.value) == "world size 6 is not divisible by parallel.tensor=4 x parallel.pipeline=1 = 4"
    with pytest.raises(ConfigError) as e:
        ParallelDims(8, tp=2, pp=3)
    assert str(e.value) == "world size 8 is not divisible by parallel.tensor=2 x parallel.pipeline=3 = 6"
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("model,tp,message", [
    (dict(d_model=6, n_heads=2, positions="learned"), 4, "model.d_model=6 is not divisible by parallel.tensor=4"),
    (dict(d_model=96, n_heads=6), 4,
     "model.n_heads=6 is not divisible by parallel.tensor=4: every tensor rank must hold whole attention heads"),
    (dict(d_model=64, n_heads=8, d_ff=100), 8,
     "MLP hidden size 100 (model.d_ff) is not divisible by parallel.tensor=8"),
])
def test_model_not_divisible(model, tp, message):
    with pytest.raises(ConfigError) as e:
        ParallelDims(tp, tp=tp).check_model(ModelConfig(**model))
    assert str(e.value) == message


def test_build_parallel_dims_single_process():
    assert not dist.is_initialized()
    dims = build_parallel_dims(Config())
    assert (dims.world_size, dims.tp_size, dims.dp_size) == (1, 1, 1)
    assert dims.tp_group is None  # a group of one: megams.parallel does not communicate
    cfg = Config(parallel={"tensor": 2, "sequence_parallel": True}, data={"seq_len": 7},
                 model={"type": "vanilla"})
    with pytest.raises(ConfigError) as e:
        build_parallel_dims(cfg, world_size=2, rank=0)
    assert str(e.value) == ("data.seq_len=7 is not divisible by parallel.tensor=2 (parallel.sequence_parallel "
                            "splits the sequence over the tensor ranks)")
    with pytest.raises(ConfigError) as e:
        build_parallel_dims(Config(parallel={"tensor": 8}, model={"n_heads": 4}), world_size=8, rank=0)
    assert "model.n_heads=4 is not divisible by parallel.tensor=8" in str(e.value)
    with pytest.raises(RuntimeError, match="not built"):
        ParallelDims(2, tp=2).tp_group


# process groups on 4 real ranks ------------------------------------------------------------------
def _groups_case(rank, world_size, tp, pp):
    dims = ParallelDims(world_size, tp, pp, rank).build_groups()
    seen = {}
    for kind, group in dims.groups.items():
        # members of my group, found by communicating in it
        onehot = torch.zeros(world_size)
        onehot[rank] = 1
        dist.all_reduce(onehot, group=group)
        seen[kind] = (onehot.nonzero().flatten().tolist(), dist.get_process_group_ranks(group),
                      dist.get_rank(group))
    return (dims.dp_rank, dims.pp_rank, dims.tp_rank), dims.group_ranks, seen


LAYOUTS = [(2, 1), (1, 2), (2, 2), (4, 1)]


@pytest.fixture(scope="module")
def groups_results():
    return run_ranks(4, [(_groups_case, layout) for layout in LAYOUTS], timeout=120)


@pytest.mark.parametrize("index", range(len(LAYOUTS)))
def test_groups_on_four_ranks(groups_results, index):
    tp, pp = LAYOUTS[index]
    for rank, (coords, expected, seen) in enumerate(groups_results[index]):
        assert coords == rank_coords(rank, tp, pp)
        for kind, (members, pg_ranks, rank_in_group) in seen.items():
            assert members == expected[kind] == pg_ranks, (tp, pp, rank, kind)
            assert rank_in_group == expected[kind].index(rank)
    if (tp, pp) == (2, 2):  # world 4 = tp2 x pp2 x dp1
        assert [r[1]["pipeline"] for r in groups_results[index]] == [[0, 2], [1, 3], [0, 2], [1, 3]]
        assert [r[1]["data"] for r in groups_results[index]] == [[0], [1], [2], [3]]

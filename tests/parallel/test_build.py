"""Shard-only construction (megams.parallel.build) against the old way: the full plain model built and
initialised on every rank, then `apply_tp` slicing it. Every materialised shard must equal the old
shard exactly; parameters of other pipeline stages must stay on the meta device; sharded parameters
keep their attributes and the sequence-parallel gradient hooks."""
import pytest
import torch

from megams.config.schema import Config
from megams.models import build_model
from megams.parallel.build import build_local_model
from megams.parallel.dims import ParallelDims
from tests.helpers.multiproc import run_ranks
from tests.models.cases import tiny

TYPES = ("vanilla", "bottom_up", "top_down", "retina")


def _cfg(model_type, tp=1, pp=1, sp=False, **model):
    return Config(model=tiny(model_type, vocab_size=300, n_layers=4, **model), data={"seq_len": 32},
                  parallel={"tensor": tp, "pipeline": pp, "sequence_parallel": sp}, training={"seed": 7})


def _old_way(cfg, dims):
    model = build_model(cfg.model, seed=cfg.training.seed)
    if dims is not None and dims.tp_size > 1:
        from megams.parallel.tensor_parallel import apply_tp
        model, _ = apply_tp(model, dims, cfg)
    return dict(model.named_parameters())


def _compare(cfg, dims):
    local = build_local_model(cfg, dims, "cpu")
    old = _old_way(cfg, dims)
    names = [n for n, _ in local.module.named_parameters()]
    assert sorted(names) == sorted(old)
    real = {n: p for n, p in local.module.named_parameters() if p.device.type != "meta"}
    assert set(real) == local.local_names
    mismatched = [n for n, p in real.items() if not torch.equal(p, old[n])]
    attrs = [n for n, p in real.items()
             if getattr(p, "tensor_model_parallel", False) != getattr(old[n], "tensor_model_parallel", False)]
    hooks = [n for n, p in real.items() if bool(old[n]._backward_hooks) != bool(p._backward_hooks)]
    tied = cfg.model.tie_embeddings and "embed.weight" in real and local.module.head.weight is local.module.embed.weight
    return {"local": sorted(real), "all": sorted(names), "mismatched": mismatched, "attrs": attrs, "hooks": hooks,
            "bytes": local.shard_bytes(), "tied": tied}


def test_single_process_equals_build_model():
    for t in TYPES:
        out = _compare(_cfg(t), None)
        assert out["mismatched"] == [] and out["local"] == out["all"], t
        assert out["tied"], t


def _tp_pp_case(rank, world_size, sp):
    dims = ParallelDims(world_size, tp=2, pp=2, rank=rank).build_groups()
    return {t: _compare(_cfg(t, tp=2, pp=2, sp=sp), dims) for t in TYPES}


@pytest.mark.parametrize("sp", [False, True], ids=["tp2pp2", "tp2pp2-sp"])
def test_tp2_pp2_shards_equal_slices_of_the_full_model(sp):
    results = run_ranks(4, [(_tp_pp_case, (sp,))], timeout=300)[0]
    for t in TYPES:
        per_rank = [r[t] for r in results]
        for rank, out in enumerate(per_rank):
            assert out["mismatched"] == [], (t, rank, out["mismatched"])
            assert out["attrs"] == [] and out["hooks"] == [], (t, rank)
        # ranks 0, 1 are stage 0 (tp 0, 1); 2, 3 stage 1: each stage holds part of the model, together all of it
        stage0, stage1 = set(per_rank[0]["local"]), set(per_rank[2]["local"])
        assert stage0 and stage1 and stage0 != stage1, t
        assert stage0 | stage1 == set(per_rank[0]["all"]), t
        assert stage0 & stage1 == {"embed.weight"}, t   # the tied embedding lives on the first and last stage
        assert per_rank[0]["bytes"] < sum(p.numel() * 4 for p in build_model(_cfg(t).model, device="meta").parameters())


def _zero3_case(rank, world_size):
    import deepspeed
    from megams.training.engine import deepspeed_config
    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    cfg = Config(model=tiny("bottom_up", vocab_size=300), data={"seq_len": 32},
                 parallel={"zero_stage": 3}, training={"seed": 7, "micro_batch_size": 2, "global_batch_size": 4})
    local = build_local_model(cfg, None, "cpu", zero3={"config": deepspeed_config(cfg, world_size, "fp32"),
                                                       "group": None})
    params = [p for _, p in local.module.named_parameters()]
    full = sum(p.ds_numel for p in params)
    from megams.training.engine import param_groups
    from megams.training.trainer import _param_count
    from megams.training.trainer import Layout
    groups = [len(g["params"]) for g in param_groups(local.module, 0.1)]  # by full shape, not the empty data
    count = _param_count(local.module, Layout(world_size, rank, world_size, rank, 1, 1, None))
    return {"partitioned": all(hasattr(p, "ds_id") for p in params), "full": full,
            "held": sum(p.ds_tensor.numel() for p in params), "bytes": local.shard_bytes(),
            "groups": groups, "count": count}


def test_zero3_partitions_each_parameter_as_it_is_made():
    out = run_ranks(2, [(_zero3_case, ())], timeout=300)[0]
    for r in out:
        assert r["partitioned"]
        assert r["held"] <= r["full"] // 2 + 64 and r["bytes"] == 4 * r["held"]   # half of every parameter (+ padding)
    plain = build_model(tiny("bottom_up", vocab_size=300), device="meta")
    assert out[0]["full"] == out[0]["count"] == sum(p.numel() for p in plain.parameters())
    from megams.training.engine import param_groups
    assert out[0]["groups"] == [len(g["params"]) for g in param_groups(plain, 0.1)]   # ZeRO-3 trained with 1 group

"""The memory planner (megams.parallel.memory_plan) against what is really allocated.

- parameters and optimizer states: equal (bytes) to what a real DeepSpeed engine holds after one
  step, built as the trainer builds it (build_local_model -> build_engine / PipelineTraining) on 4
  gloo ranks, for tp2 x pp2 (ZeRO 0, 1) and tp2 x dp2 (ZeRO 2, 3) runs of the tiny configs;
- activations of one micro-batch: within 15% of the bytes autograd saves (saved_tensors_hooks),
  per rank of the same runs and in one process for every checkpointing mode;
- the pieces (ZeRO layouts, 1F1B in-flight counts, point-to-point volume) on their own.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from megams.config import load_config
from megams.parallel.memory_plan import model_state_bytes, optimizer_groups, plan_memory
from tests.helpers.multiproc import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny")


def _cfg(name, sets=()):
    return load_config(os.path.join(TINY, f"{name}.yaml"), list(sets))


# --- measured on real ranks ----------------------------------------------------------------------
def _storages(tensors):
    out = {}
    for t in tensors:
        if t is not None and t.numel() > 0:
            st = t.untyped_storage()
            out[st.data_ptr()] = st.nbytes()
    return out


def _torch_optimizer(opt):
    while not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def _saved_activation_bytes(cfg, local, dims):
    """Bytes autograd saves for one micro-batch of this rank's stage (parameters excluded)."""
    from megams.models.cost import saved_tensor_bytes
    from megams.parallel.pipeline import LocalStage, model_factors, plan_bytes_per_element, plan_pipeline
    mb, T, d = cfg.training.micro_batch_size, cfg.data.seq_len, cfg.model.d_model
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.model.vocab_size, (mb, T), generator=g)
    y = torch.randint(0, cfg.model.vocab_size, (mb, T), generator=g)
    params = [p for _, p in local.local_parameters()]
    if dims is None or dims.pp_size == 1:
        return saved_tensor_bytes(lambda: local.loss_fn(local.module(x), y), exclude=params)
    plan = plan_pipeline(local.module, cfg, dims.pp_size, plan_bytes_per_element(cfg))
    s = dims.pp_rank
    stage = LocalStage(plan, plan.layer_bounds[s], plan.layer_bounds[s + 1], model_factors(cfg.model))
    if s > 0:
        from megams.parallel.pipeline import scale_factors
        K = scale_factors(model_factors(cfg.model))
        positions = sum(T // K[k] for k in plan.input_scales(s))
        dtype = next(p for _, p in local.local_parameters()).dtype
        x = torch.randn(mb, positions, d, generator=g).to(dtype).requires_grad_()
    last = s == dims.pp_size - 1
    return saved_tensor_bytes(lambda: local.loss_fn(stage(x), y) if last else stage(x), exclude=params)


def _engine_case(rank, world_size, config, sets):
    """Build this rank's engine as the trainer does, run one step, measure what it holds."""
    import deepspeed
    from megams.parallel.build import build_local_model
    from megams.parallel.dims import build_parallel_dims
    from megams.parallel.random import seed_parallel_rng
    from megams.training.engine import build_engine, precision_mode
    from megams.training.trainer import Layout, _forget_deepspeed_topology
    torch.manual_seed(0)
    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    cfg = _cfg(config, sets)
    dims = build_parallel_dims(cfg)
    seed_parallel_rng(cfg.training.seed, dims)
    mode = precision_mode(cfg, "cpu")
    # activations: on this rank's shard built on its own (the engine's parameters may be partitioned)
    local = build_local_model(cfg, dims, "cpu")
    if mode == "ds_bf16":  # what DeepSpeed does to the module first: activations are then bf16 too
        local.module.bfloat16()
    activations = _saved_activation_bytes(cfg, local, dims)
    del local
    # the engine, over this rank's shard as build_local_model makes it (DeepSpeed partitions ZeRO-3 itself)
    layout = Layout(world_size, rank, dims.dp_size, dims.dp_rank, dims.tp_size, dims.pp_size, dims)
    built = build_local_model(cfg, dims, "cpu")
    model, loss_fn = built.module, built.loss_fn
    mb, T = cfg.training.micro_batch_size, cfg.data.seq_len
    g = torch.Generator().manual_seed(1 + dims.dp_rank)
    m = cfg.grad_accum_steps(dims.dp_size)
    batches = [(torch.randint(0, cfg.model.vocab_size, (mb, T), generator=g),
                torch.randint(0, cfg.model.vocab_size, (mb, T), generator=g)) for _ in range(m)]
    if dims.pp_size > 1:
        from megams.training.pipeline_step import PipelineTraining
        pipe = PipelineTraining(cfg, layout)
        engine, _ = pipe.build_engine(model, loss_fn, mode)
        pipe.train_step(engine, batches)
    else:
        engine, _, _ = build_engine(cfg, model, dims.dp_size, mode, mpu=dims.mpu)
        for x, y in batches:
            loss = loss_fn(engine(x), y)
            engine.backward(loss)
            engine.step()
    module_params = list(engine.module.parameters())
    weights = _storages([p.data for p in module_params] + [getattr(p, "ds_tensor", None) for p in module_params])
    # ZeRO-0 keeps the model's own tensors: count their elements (a tensor may be a view of a larger
    # storage: test_materialised_shards_own_their_storage); ZeRO >= 1 flattens them into fresh buffers
    own = sum(p.numel() * p.element_size() for p in module_params if p.numel() > 0)
    opt = _torch_optimizer(engine.optimizer)
    # the master weights: the optimizer's parameters (ZeRO-3 only puts them in param_groups during
    # its step, but its state is keyed by them)
    masters = _storages([p for grp in opt.param_groups for p in grp["params"]] + list(opt.state.keys()))
    masters = {k: v for k, v in masters.items() if k not in weights}
    states = _storages([v for st in opt.state.values() for v in st.values()
                        if torch.is_tensor(v) and v.numel() > 1])  # exp_avg, exp_avg_sq (not the step count)
    out = {"stage": dims.pp_rank, "tp_rank": dims.tp_rank,
           "weights": own if cfg.parallel.zero_stage == 0 else sum(weights.values()),
           "weights_storage": sum(weights.values()), "weights_own": own,
           "optimizer": sum(masters.values()) + sum(states.values()), "activations": activations}
    del engine
    _forget_deepspeed_topology()
    return out


def _check_against_plan(config, sets, results, world_size=4):
    cfg = _cfg(config, sets)
    plan = plan_memory(cfg, world_size)
    for r in results:
        role = plan.roles[r["stage"]]
        print(config, sets, r, role.weights, role.optimizer, role.activations_per_micro_batch)
        where = f"{config} {sets} stage {r['stage']} tensor rank {r['tp_rank']}"
    for r in results:
        role = plan.roles[r["stage"]]
        where = f"{config} {sets} stage {r['stage']} tensor rank {r['tp_rank']}"
        assert r["weights"] == role.weights, where
        assert r["optimizer"] == role.optimizer, where
        assert r["activations"] == pytest.approx(role.activations_per_micro_batch, rel=0.15), where


DEFAULT_RUNS = [
    ("bottom_up", ["parallel.tensor=2", "parallel.pipeline=2", "parallel.zero_stage=0",
                   "training.global_batch_size=16"]),
    ("top_down", ["parallel.tensor=2", "parallel.pipeline=2", "parallel.zero_stage=1", "training.precision=bf16",
                  "training.global_batch_size=16"]),
    ("vanilla", ["parallel.tensor=2", "parallel.zero_stage=2", "training.global_batch_size=16"]),
    # fp32: on CPU, SDPA's math kernel runs bf16 masked attention (retina) in fp32 and saves it so
    # (+39% activations, a CPU-only effect: on CUDA it is flex_attention, which saves no probabilities)
    ("retina", ["parallel.tensor=2", "parallel.zero_stage=3", "training.global_batch_size=16"]),
]
FULL_RUNS = [
    ("bottom_up", ["parallel.tensor=2", "parallel.pipeline=2", "parallel.zero_stage=1",
                   "parallel.activation_checkpointing.mode=full", "training.global_batch_size=16"]),
    ("bottom_up_30l", ["parallel.tensor=2", "parallel.pipeline=2", "parallel.zero_stage=1", "training.precision=bf16",
                       "parallel.activation_checkpointing.mode=attention", "training.global_batch_size=16"]),
    ("vanilla", ["parallel.tensor=2", "parallel.pipeline=2", "parallel.zero_stage=0",
                 "parallel.activation_checkpointing.mode=every_k", "training.global_batch_size=16"]),
    ("bottom_up", ["parallel.tensor=2", "parallel.zero_stage=3", "training.global_batch_size=16"]),
    ("top_down", ["parallel.tensor=2", "parallel.zero_stage=2", "training.precision=bf16",
                  "training.global_batch_size=16"]),
    ("vanilla", ["parallel.zero_stage=1", "training.global_batch_size=32"]),
    ("retina", ["parallel.zero_stage=1", "training.global_batch_size=32"]),
]


def _run(runs):
    results = run_ranks(4, [(_engine_case, (c, s)) for c, s in runs], timeout=400)
    errors = []
    for (config, sets), per_rank in zip(runs, results):
        try:
            _check_against_plan(config, sets, per_rank)
        except AssertionError as e:
            errors.append(str(e).splitlines()[0])
    assert not errors, "\n".join(errors)


def test_plan_equals_deepspeed_allocation():
    """tp2 x pp2 ZeRO-0 / ZeRO-1 bf16, tp2 x dp2 ZeRO-2 and ZeRO-3: four tiny models."""
    _run(DEFAULT_RUNS)


@pytest.mark.full
def test_plan_equals_deepspeed_allocation_full():
    _run(FULL_RUNS)


# --- in one process ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vanilla", "bottom_up", "top_down", "retina", "bottom_up_30l"])
@pytest.mark.parametrize("mode", ["none", "full", "attention", "every_k"])
def test_activations_within_15_percent(name, mode):
    from megams.parallel.build import build_local_model
    cfg = _cfg(name, [f"parallel.activation_checkpointing.mode={mode}", "training.micro_batch_size=2",
                      "training.global_batch_size=2"])
    local = build_local_model(cfg, None, "cpu")
    measured = _saved_activation_bytes(cfg, local, None)
    planned = plan_memory(cfg, 1).roles[0].activations_per_micro_batch
    assert planned == pytest.approx(measured, rel=0.15)


def test_zero_layouts():
    groups = [[1000, 10], [7]]  # one group: 1010 elements -> 1012 aligned for dp=2 (x2 alignment), 1016 for dp=4
    z0 = model_state_bytes(groups, 0, 4, 4)
    assert (z0["weights"], z0["grads"], sum(z0["optimizer"].values())) == (4 * 1017, 4 * 1017, 8 * 1017)
    z1 = model_state_bytes(groups, 1, 4, 2)
    a = [math.ceil(1010 / 8) * 8, 8]
    assert z1["weights"] == 2 * sum(a)
    assert z1["optimizer"] == {k: 4 * sum(x // 4 for x in a) for k in ("master", "exp_avg", "exp_avg_sq")}
    z2 = model_state_bytes(groups, 2, 4, 2)
    assert z2["grads"] < z1["grads"] and z2["optimizer"] == z1["optimizer"]
    z3 = model_state_bytes(groups, 3, 4, 2)
    part = math.ceil(1000 / 4) + math.ceil(10 / 4) + math.ceil(7 / 4)
    assert z3["weights"] == 2 * (part + 1017)  # every one of these is under the persistence threshold
    assert z3["optimizer"]["master"] == 4 * part


def test_roles_in_flight_and_p2p():
    cfg = _cfg("bottom_up_30l", ["parallel.tensor=2", "parallel.pipeline=4", "training.global_batch_size=32",
                                 "parallel.zero_stage=1"])
    plan = plan_memory(cfg, 16)  # dp 2: 32 / (4 x 2) = 4 micro-batches
    assert plan.micro_batches == 4 and [r.in_flight for r in plan.roles] == [4, 3, 2, 1]
    assert [r.rank for r in plan.roles] == [0, 2, 4, 6]
    assert plan.roles[-1].send_bytes_per_micro_batch == 0
    assert all(r.send_bytes_per_micro_batch > 0 for r in plan.roles[:-1])
    # the stages cover the model once, the tied embedding on the first and the last
    local = sum(r.params for r in plan.roles)
    assert local > plan.total_params / 2  # each of 2 tensor ranks holds about half


def test_optimizer_groups_match_the_trainer():
    from megams.models import build_model
    from megams.training.engine import param_groups
    model = build_model(_cfg("bottom_up").model, device="meta")
    ours = optimizer_groups(list(model.named_parameters()))
    theirs = [[p.numel() for p in g["params"]] for g in param_groups(model, 0.1)]
    assert ours == theirs


def test_boundary_positions_carry_the_scales():
    from megams.parallel.partition import boundary_positions, pipeline_units
    cfg = _cfg("bottom_up")  # k = (4, 4), T = 256: after shorten.1 the state is (h_2, h_0, h_1)
    units = pipeline_units(cfg.model, 256)
    pos = dict(zip([u.name for u in units], boundary_positions(units)))
    assert pos["embed"] == 256 and pos["shorten.0"] == 64 + 256 and pos["shorten.1"] == 16 + 256 + 64
    assert pos["aggregate"] == 256 and pos["head"] == 0
    cfg = _cfg("top_down")
    units = pipeline_units(cfg.model, 256)
    pos = dict(zip([u.name for u in units], boundary_positions(units)))
    assert pos["shorten.1"] == 16 + 256 + 64 and pos["upsample.1"] == 64 + 256 and pos["upsample.0"] == 256


def test_overhead_rows_per_device():
    from megams.parallel.partition import MEASURED_OVERHEAD_ROWS, overhead_rows
    cfg = _cfg("bottom_up")
    assert "pipeline_overhead_rows" not in cfg.parallel.model_fields_set
    assert overhead_rows(cfg.parallel, "cpu") == (MEASURED_OVERHEAD_ROWS["cpu"], "measured on cpu")
    rows, source = overhead_rows(cfg.parallel, "Some GPU")
    assert rows == cfg.parallel.pipeline_overhead_rows and "not measured on Some GPU" in source
    cfg = _cfg("bottom_up", ["parallel.pipeline_overhead_rows=7"])
    assert overhead_rows(cfg.parallel, "cpu") == (7, "parallel.pipeline_overhead_rows")


def test_materialised_shards_own_their_storage():
    from megams.parallel.memory_plan import build_role
    cfg = _cfg("vanilla", ["parallel.tensor=2"])
    _, local = build_role(cfg, 2, 1, device="cpu")
    held = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for _, p in local.local_parameters()}
    assert sum(held.values()) == local.shard_bytes()

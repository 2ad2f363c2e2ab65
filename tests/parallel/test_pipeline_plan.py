"""The pipeline description of every model, in one process (no DeepSpeed engine): the layer list
cut at EVERY boundary (each layer its own stage, state packed and unpacked in between) computes
exactly the plain model; partitioning by cost / uniform / explicit; config errors."""
import pytest
import torch

from megams.config import ConfigError
from megams.config.schema import Config, DataConfig, ParallelConfig
from megams.models import build_model
from megams.parallel.partition import balanced_bounds, partition, pipeline_units, stage_costs
from megams.parallel.pipeline import LocalStage, model_factors, pack, plan_pipeline, unpack
from megams.training.loss import lm_loss
from tests.models.cases import all_cases, tiny

T = 32


def _cfg(model_cfg, **parallel):
    return Config(model=model_cfg, data=DataConfig(seq_len=T, tokenizer="tokenizer.model"),
                  parallel=ParallelConfig(**parallel))


@pytest.mark.parametrize("model_type,combo", all_cases())
def test_layer_list_cut_everywhere_is_the_model(model_type, combo):
    """Every model option (pairwise): logits bit-identical, gradients equal to float rounding."""
    mc = tiny(model_type, **combo)
    ref, model = build_model(mc, seed=3), build_model(mc, seed=3)
    plan = plan_pipeline(model, _cfg(mc), 1)
    tied = {}
    stages = [LocalStage(plan, i, i + 1, model_factors(mc), tied) for i in range(len(plan.specs))]
    tokens = torch.randint(0, mc.vocab_size, (2, T + 1), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]
    h = x
    for stage in stages:
        h = stage(h)
    want = ref(x)
    assert torch.equal(h, want)
    lm_loss(h, y).backward()
    lm_loss(want, y).backward()
    got = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        assert got[name].grad is not None, name
        torch.testing.assert_close(got[name].grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_boundary_carries_every_scale_in_one_tensor():
    mc = tiny("bottom_up")  # k = (2, 4): scales of length n, n/2, n/8
    n = 16
    state = (torch.randn(2, n // 8, 4), torch.randn(2, n, 4), torch.randn(2, n // 2, 4))  # (h_2, h_0, h_1)
    packed = pack(state)
    assert packed.shape == (2, n // 8 + n + n // 2, 4)
    back = unpack(packed, (2, 0, 1), model_factors(mc))
    assert all(torch.equal(a, b) for a, b in zip(back, state))
    assert unpack(state[1], (0,), [])[0] is state[1]


def test_scales_carried_across_the_stack():
    model = build_model(tiny("bottom_up"), device="meta")
    plan = plan_pipeline(model, _cfg(tiny("bottom_up")), 1)
    names = [plan.units[u].name for u in plan.unit_of_layer]
    assert names == ["embed", "scale_blocks.0.0", "shorten.0", "scale_blocks.1.0", "shorten.1", "scale_blocks.2.0",
                     "aggregate", "post_blocks.0", "head", "head"]
    assert plan.scales[:8] == [(0,), (0,), (1, 0), (1, 0), (2, 0, 1), (2, 0, 1), (0,), (0,)]
    td = tiny("top_down")
    plan = plan_pipeline(build_model(td, device="meta"), _cfg(td), 1)
    assert [plan.units[u].name for u in plan.unit_of_layer][:8] == [
        "embed", "shorten.0", "shorten.1", "scale_blocks.2.0", "upsample.1", "scale_blocks.1.0", "upsample.0",
        "scale_blocks.0.0"]
    assert plan.scales[:8] == [(0,), (1, 0), (2, 0, 1), (2, 0, 1), (1, 0), (1, 0), (0,), (0,)]


# --- partitioning ---------------------------------------------------------------------------------
def test_balanced_bounds_minimise_the_heaviest_stage():
    assert balanced_bounds([1, 1, 1, 1], 2) == [0, 2, 4]
    assert balanced_bounds([4, 1, 1, 1, 1], 2) == [0, 1, 5]
    assert balanced_bounds([1, 2, 3, 4, 5, 6], 3) == [0, 3, 5, 6]  # 6 | 9 | 6
    assert balanced_bounds([5, 0, 0, 5], 2) in ([0, 1, 4], [0, 2, 4], [0, 3, 4])
    with pytest.raises(ConfigError, match="cannot cut 2 pipeline units into 3"):
        balanced_bounds([1, 1], 3)


def _paper_shape():
    return tiny("bottom_up", d_model=128, n_heads=4, vocab_size=256, shorten_factors=[4, 4],
                layers_per_scale=[2, 12, 14], n_post=2, max_seq_len=256)


def test_cost_partition_balances_what_layer_count_does_not():
    """The 30-layer bottom-up shape: a coarse block costs ~1/4 or ~1/16 of a full-resolution one."""
    units = pipeline_units(_paper_shape(), 256)
    coarse = [u for u in units if u.kind == "block" and u.scale == 2][0]
    fine = [u for u in units if u.kind == "block" and u.scale == 0][0]
    assert fine.flops / coarse.flops > 12
    for p in (2, 3, 4):
        def imbalance(bounds):
            f = [c.flops for c in stage_costs(units, bounds)]
            return max(f) / (sum(f) / p)
        cost, uniform = imbalance(partition(units, p, "cost")), imbalance(partition(units, p, "uniform"))
        assert cost < uniform and cost < 1.25, (p, cost, uniform)


def test_uniform_partition_splits_blocks_evenly():
    units = pipeline_units(_paper_shape(), 256)
    bounds = partition(units, 2, "uniform")
    blocks = [sum(u.kind == "block" for u in units[a:b]) for a, b in zip(bounds, bounds[1:])]
    assert blocks == [15, 15]


def test_explicit_layout_and_its_errors():
    units = pipeline_units(tiny("vanilla"), T)  # embed, blocks.0, blocks.1, head
    assert partition(units, 2, "explicit", [1, 3]) == [0, 1, 4]
    with pytest.raises(ConfigError, match=r"pipeline_layout=\[2, 3\] must give 2 positive unit counts summing to "
                                          r"the model's 4 pipeline units: embed, blocks.0, blocks.1, head"):
        partition(units, 2, "explicit", [2, 3])


def test_stage_memory_counts_micro_batches_in_flight():
    units = pipeline_units(tiny("vanilla"), T)
    costs = stage_costs(units, [0, 2, 4], micro_batch=2, micro_batches=8, tied_head_params=100, bytes_per_param=16)
    assert [c.in_flight for c in costs] == [2, 1]
    assert costs[1].params == units[2].params + units[3].params + 100
    assert costs[0].activation_bytes == pytest.approx(2 * 2 * (units[0].activation_bytes + units[1].activation_bytes))


@pytest.mark.parametrize("over,message", [
    ({"pipeline": 2, "zero_stage": 2}, "zero_stage=2 with pipeline=2: DeepSpeed refuses ZeRO-2/3 with pipeline "
                                       "parallelism; use zero_stage 0 or 1"),
    ({"pipeline": 2, "zero_stage": 3}, "zero_stage=3 with pipeline=2: DeepSpeed refuses ZeRO-2/3"),
    ({"pipeline": 2, "pipeline_partition": "explicit"}, "pipeline_partition=explicit needs pipeline_layout with one "
                                                        "unit count per stage (2), got []"),
    ({"pipeline": 2, "pipeline_layout": [2, 2]}, "pipeline_layout=[2, 2] is only used with "
                                                 "pipeline_partition=explicit (got cost)"),
    ({"activation_checkpointing": {"partition_activations": True}}, "partition_activations=true needs a "
                                                                    "checkpointing mode"),
    ({"tensor": 2, "sequence_parallel": True, "activation_checkpointing": {"mode": "full", "partition_activations": True}},
     "partition_activations with sequence_parallel"),
])
def test_config_errors(over, message):
    from megams.config import load_config
    sets = []
    for k, v in over.items():
        if isinstance(v, dict):
            sets += [f"parallel.{k}.{kk}={str(vv).lower() if isinstance(vv, bool) else vv}" for kk, vv in v.items()]
        else:
            sets.append(f"parallel.{k}={str(v).lower() if isinstance(v, bool) else v}")
    with pytest.raises(ConfigError) as err:
        load_config(None, sets)
    assert message in str(err.value)

"""Costs from the config: exact parameter counts, FLOPs that follow the formula, per-layer records
that name real modules, and an activation estimate that tracks what autograd really saves."""
import math

import pytest
import torch
import torch.nn.functional as F

from megams.models import build_model
from megams.models.cost import (activation_bytes_per_token, flops_per_token, layer_costs, param_count,
                                saved_tensor_bytes)
from tests.models.cases import all_cases, tiny


@pytest.mark.parametrize("model_type,combo", all_cases())
def test_param_count_matches_built_model(model_type, combo):
    cfg = tiny(model_type, **combo)
    model = build_model(cfg, device="meta")
    assert param_count(cfg) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model_type", ["vanilla", "bottom_up", "top_down", "retina"])
def test_layer_costs_name_real_modules_in_order(model_type):
    cfg = tiny(model_type, pooling="attention", upsampling="linear") if model_type in ("bottom_up", "top_down") \
        else tiny(model_type)
    model = build_model(cfg, device="meta")
    costs = layer_costs(cfg, 48)
    assert costs[0].name == "embed" and costs[-1].name == "head"
    for c in costs[1:-1]:
        mod = model.get_submodule(c.name)
        assert c.params == sum(p.numel() for p in mod.parameters()), c.name
        assert c.flops > 0 or c.kind in ("shorten", "upsample", "aggregate"), c
    blocks = [c for c in costs if c.kind == "block"]
    assert len(blocks) == model.num_layers
    ks = cfg.shorten_factors if model_type in ("bottom_up", "top_down") else []
    assert all(c.seq_len == 48 // math.prod(ks[:c.scale]) for c in blocks)


def test_vanilla_flops_formula():
    cfg = tiny("vanilla", n_layers=3, tie_embeddings=False)
    d, f, V, L, n = 32, 128, 64, 3, 40
    per_layer_fwd = 2 * (4 * d * d + 2 * d * f) + 4 * d * (n + 1) / 2
    expected = 3 * (L * per_layer_fwd + 2 * d * V)
    assert flops_per_token(cfg, n) == pytest.approx(expected)


def test_coarse_scales_and_retina_windows_are_cheaper():
    n = 1024
    van = flops_per_token(tiny("vanilla", n_layers=6, d_model=128, n_heads=4), n)
    bu = flops_per_token(tiny("bottom_up", layers_per_scale=[1, 2, 2], n_post=1, d_model=128, n_heads=4,
                              aggregation="sum"), n)
    ret = flops_per_token(tiny("retina", n_layers=6, d_model=128, n_heads=4), n)
    assert bu < 0.6 * van and ret < van
    # blocks at scale s run over n / K_s positions and cost ~1/K_s per token
    costs = layer_costs(tiny("bottom_up", d_model=128, n_heads=4), n)
    s0 = next(c for c in costs if c.name == "scale_blocks.0.0")
    s2 = next(c for c in costs if c.name == "scale_blocks.2.0")
    assert s2.seq_len == n // 8 and s2.flops < s0.flops / 7


@pytest.mark.parametrize("model_type,combo", [
    ("vanilla", {}), ("vanilla", {"mlp": "swiglu", "norm": "rmsnorm"}),
    ("bottom_up", {}), ("bottom_up", {"pooling": "attention", "upsampling": "attention"}),
    ("top_down", {"upsampling": "linear"}), ("retina", {}),
])
def test_activation_estimate_tracks_measurement(model_type, combo):
    cfg = tiny(model_type, **combo)
    model = build_model(cfg)
    tokens = torch.randint(0, 64, (2, 64))
    measured = saved_tensor_bytes(lambda: F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()),
                                  exclude=list(model.parameters())) / tokens.numel()
    estimate = activation_bytes_per_token(cfg, 64, bytes_per_element=4)
    assert 0.75 < measured / estimate < 1.33, (measured, estimate)

"""Deterministic, layout-independent initialisation.

Every parameter is drawn from its own `torch.Generator` seeded by (seed, crc32(name)) over its FULL
shape, on CPU in fp32, then copied to wherever the parameter lives. So a value depends only on
(seed, name, shape, kind): not on the device, not on module creation order, and not on how tensor or
pipeline parallelism later splits the model (a shard can be cut from the full tensor).
"""
from __future__ import annotations

import math
import zlib
from typing import Callable, Optional, Sequence

import torch
from torch import nn

_MASK64 = (1 << 64) - 1
OUTPUT_PROJECTIONS = ("wo", "fc_out", "w_down")  # write into the residual stream: scaled by 1/sqrt(2L)


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def param_seed(seed: int, name: str) -> int:
    """A 32-bit generator seed from (seed, crc32(name)). torch's CPU generator (mt19937) keeps only
    the low 32 bits of its seed, so the pair is mixed (splitmix64) rather than concatenated."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ zlib.crc32(name.encode("utf-8"))) >> 32


def normal_init(seed: int, name: str, shape, std: float) -> torch.Tensor:
    """N(0, std) values of the parameter `name`, as a CPU fp32 tensor of the full `shape`."""
    g = torch.Generator(device="cpu").manual_seed(param_seed(seed, name))
    return torch.empty(tuple(shape), dtype=torch.float32).normal_(0.0, std, generator=g)


def _is_norm(module: nn.Module) -> bool:
    """torch's norms, and fused ones (apex's FusedLayerNorm/FusedRMSNorm) recognised by name."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def initializer(model: nn.Module, seed: int, std: float,
                num_layers: Optional[int] = None) -> Callable[[str, Sequence[int]], torch.Tensor]:
    """`value(name, full_shape) -> CPU fp32 tensor`: the initial value of parameter `name` of `model`
    over its FULL (unsplit) shape. A module's `init_rules` {param name: "zeros" | "ones" | "std"}
    first (constants; `std`: the value std, e.g. the small gain of scales.Merge's norm); then norm
    weights 1, biases 0, everything else N(0, std); output
    projections N(0, std/sqrt(2L)) with L = `num_layers` (default `model.num_layers`, its blocks).
    Only names and module kinds are read from `model`: it may live on the meta device, already
    split by tensor parallelism (megams.parallel.build materialises shards with it)."""
    L = num_layers if num_layers is not None else getattr(model, "num_layers", 1)
    out_std = std / math.sqrt(2 * max(L, 1))
    norms = {f"{mod_name}.{p_name}" if mod_name else p_name
             for mod_name, mod in model.named_modules() if _is_norm(mod)
             for p_name, _ in mod.named_parameters(recurse=False)}
    rules = {f"{mod_name}.{p_name}" if mod_name else p_name: rule  # a module's own `init_rules`
             for mod_name, mod in model.named_modules()
             for p_name, rule in (getattr(mod, "init_rules", None) or {}).items()}

    def value(name: str, shape: Sequence[int]) -> torch.Tensor:
        leaf = name.rsplit(".", 1)
        if name in rules:  # constants: the same whatever the layout
            fill = {"zeros": 0.0, "ones": 1.0, "std": std}[rules[name]]
            return torch.full(tuple(shape), fill, dtype=torch.float32)
        if name in norms and leaf[-1] == "weight":
            return torch.ones(tuple(shape), dtype=torch.float32)
        if leaf[-1] == "bias":
            return torch.zeros(tuple(shape), dtype=torch.float32)
        is_out = len(leaf) == 2 and leaf[-1] == "weight" and leaf[0].rsplit(".", 1)[-1] in OUTPUT_PROJECTIONS
        return normal_init(seed, name, shape, out_std if is_out else std)

    return value


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int, std: float, num_layers: Optional[int] = None) -> None:
    """Initialise every parameter of the plain (unsplit) `model` in place with `initializer`'s values."""
    value = initializer(model, seed, std, num_layers)
    for name, p in model.named_parameters():  # tied parameters appear once, under their first name
        p.copy_(value(name, p.shape))

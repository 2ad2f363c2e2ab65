"""Shard-only construction: each rank builds only what it holds (torchtitan's meta-device flow).

    local = build_local_model(cfg, dims, device)   # dims: ParallelDims or None (one process / pure dp)
    local.module, local.loss_fn                    # the plain model after apply_tp and apply_ac
    local.local_parameters()                       # [(name, param)]: what this rank materialised
    local.shard_bytes()

1. The plain model is built on the meta device (shapes, no storage).
2. Tensor parallelism (`apply_tp`) and activation checkpointing (`apply_ac`) are applied to the
   skeleton: the layers swap in their sharded versions, still on meta.
3. With pipeline parallelism, the partition (`plan_pipeline`, the same one `build_pipeline` makes
   later) names the modules of this rank's stage; every other parameter stays on meta and costs
   nothing. The tied embedding is materialised on both stages that use it.
4. Each local parameter is materialised on `device`, one at a time: its FULL value is generated
   by `megams.models.init.initializer` (seed, name, full shape: the same value on every layout),
   padded like the shard (vocabulary rows), cut to this tensor rank's slice, and copied to the
   device. Peak host memory: this rank's shard (when `device` is the host) + one full parameter.

The values are those of `build_model(cfg.model, seed)` followed by `apply_tp` (tests/parallel/
test_build.py holds every shard to a slice of the full model built the old way). Parameters keep
their attributes (`tensor_model_parallel`, `partition_dim`, ...) and the gradient hooks that
`apply_tp` registered on the skeleton's parameters.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Tuple

import torch
from torch import nn


@dataclass
class LocalModel:
    module: nn.Module
    loss_fn: Callable
    dims: Optional[object] = None
    stage: Optional[int] = None                  # pipeline stage, None without pipeline parallelism
    local_names: Set[str] = field(default_factory=set)

    def local_parameters(self) -> List[Tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.module.named_parameters() if n in self.local_names]

    def shard_bytes(self) -> int:
        """Bytes this rank holds of its parameters (its ZeRO-3 partitions, when partitioned)."""
        total = 0
        for _, p in self.local_parameters():
            t = getattr(p, "ds_tensor", None)
            t = p if t is None else t
            total += t.numel() * t.element_size()
        return total


def build_local_model(cfg, dims=None, device="cpu", seed: Optional[int] = None,
                      zero3: Optional[dict] = None) -> LocalModel:
    """This rank's part of the model of `cfg` (see the module docstring). `device="meta"` stops after
    step 3: the skeleton with its local parameter names, for planning without allocating.
    `zero3={"config": deepspeed_config, "group": data-parallel group or None, "mpu": the layout's mpu}`
    (the mpu gives DeepSpeed the data-parallel world its batch sizes are checked against): ZeRO-3 partitions each
    parameter over the data ranks as soon as it is materialised (DeepSpeed's `zero.Init(module=...)`,
    one parameter at a time), so a rank never holds more than its partitions + one full parameter."""
    from megams.models import build_model
    from megams.models.init import initializer
    from megams.parallel.checkpointing import apply_ac
    from megams.training.loss import lm_loss

    seed = cfg.training.seed if seed is None else seed
    model = build_model(cfg.model, device="meta")
    loss_fn = lm_loss
    if dims is not None and dims.tp_size > 1:
        from megams.parallel.tensor_parallel import apply_tp
        model, loss_fn = apply_tp(model, dims, cfg)
    value = initializer(model, seed, cfg.model.init_std)  # names and module kinds only: before apply_ac wraps them
    apply_ac(model, cfg, dims)
    stage, keep = None, None
    if dims is not None and dims.pp_size > 1:
        stage = dims.pp_rank
        keep = {id(p) for m in stage_modules(model, cfg, dims) for p in m.parameters()}
    names = {}
    for n, p in model.named_parameters():
        names.setdefault(id(p), n)
    local = {n for pid, n in names.items() if keep is None or pid in keep}
    if str(device) != "meta":
        materialize(model, value, device, dims, keep, then=_zero3_partitioner(zero3) if zero3 else None)
    return LocalModel(model, loss_fn, dims, stage, local)


def stage_modules(model: nn.Module, cfg, dims) -> List[nn.Module]:
    """The plain model's submodules that this rank's pipeline stage runs (the partition of
    `build_pipeline`, computed from costs alone: no parameter is touched)."""
    from megams.parallel.pipeline import plan_pipeline, plan_bytes_per_element
    plan = plan_pipeline(model, cfg, dims.pp_size, plan_bytes_per_element(cfg))
    lo, hi = plan.layer_bounds[dims.pp_rank], plan.layer_bounds[dims.pp_rank + 1]
    out: List[nn.Module] = []
    for spec in plan.specs[lo:hi]:
        for arg in (*spec.module_args, *spec.module_kwargs.values()):
            if isinstance(arg, nn.Module):
                out.append(arg)
    return out


def _split_of(module: nn.Module, name: str) -> Optional[Tuple[int, int]]:
    """(dim, full size) along which a tensor-parallel layer splits its parameter `name`."""
    from megams.parallel.tensor_parallel import _split
    return _split(module, name)


def _shard(full: torch.Tensor, dim: int, padded: int, tp: int, tp_rank: int) -> torch.Tensor:
    if padded > full.size(dim):  # padded vocabulary rows are zeros
        pad = list(full.shape)
        pad[dim] = padded - full.size(dim)
        full = torch.cat([full, full.new_zeros(pad)], dim)
    return full.chunk(tp, dim)[tp_rank]


@torch.no_grad()
def materialize(model: nn.Module, value: Callable, device, dims=None, keep: Optional[Set[int]] = None,
                then: Optional[Callable[[nn.Parameter], None]] = None) -> int:
    """Replace every meta parameter of `model` (those whose id is in `keep`, when given) by a real one
    on `device` holding `value(name, full_shape)` cut to this rank's shard. Shared parameters (a tied
    head) stay shared. `then(param)` runs on each new parameter before the next one is made (ZeRO-3
    partitioning). Returns the bytes materialised (before any partitioning)."""
    names: Dict[int, str] = {}
    for n, p in model.named_parameters():
        names.setdefault(id(p), n)
    tp = dims.tp_size if dims is not None else 1
    tp_rank = dims.tp_rank if dims is not None else 0
    done: Dict[int, nn.Parameter] = {}
    total = 0
    for module in model.modules():
        for pname, p in list(module._parameters.items()):
            if p is None or (keep is not None and id(p) not in keep):
                continue
            if id(p) not in done:
                shape = list(p.shape)
                split = _split_of(module, pname) if tp > 1 else None
                if split is not None:
                    dim, size = split
                    shape[dim] = size
                full = value(names[id(p)], shape)
                t = full if split is None else _shard(full, split[0], p.shape[split[0]] * tp, tp, tp_rank)
                t = t.to(device=device, dtype=p.dtype).contiguous()
                if t.untyped_storage().nbytes() > t.numel() * t.element_size():
                    t = t.clone()  # a dim-0 chunk is a contiguous view: never keep the full tensor alive
                new = nn.Parameter(t, requires_grad=p.requires_grad)
                del full, t
                _carry_over(p, new)
                done[id(p)] = new
                total += new.numel() * new.element_size()
                if then is not None:
                    then(new)
            module._parameters[pname] = done[id(p)]
    return total


class _Holder(nn.Module):
    def __init__(self, p: nn.Parameter):
        super().__init__()
        self.p = p


def _zero3_partitioner(zero3: dict) -> Callable[[nn.Parameter], None]:
    """Partition one parameter over the data ranks with DeepSpeed's public `zero.Init(module=...)`."""
    import deepspeed

    def partition(p: nn.Parameter) -> None:
        deepspeed.zero.Init(module=_Holder(p), config_dict_or_path=zero3["config"],
                            data_parallel_group=zero3.get("group"), mpu=zero3.get("mpu"))
    return partition


def _carry_over(old: nn.Parameter, new: nn.Parameter) -> None:
    """Attributes (tensor_model_parallel, partition_dim, sequence_parallel, ...) and gradient hooks."""
    for k, v in vars(old).items():
        setattr(new, k, v)
    for hook in (old._backward_hooks or {}).values():
        new.register_hook(hook)
    for hook in (getattr(old, "_post_accumulate_grad_hooks", None) or {}).values():
        new.register_post_accumulate_grad_hook(hook)

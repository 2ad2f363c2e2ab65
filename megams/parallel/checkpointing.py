"""Activation checkpointing, applied to a built model from outside: `apply_ac(model, cfg, dims)`.

Modes (`parallel.activation_checkpointing`):
- `full`: every transformer `Block` keeps only its input and recomputes the rest in backward;
- `attention` (selective): every block's attention sublayer (q/k/v/o projections, rotary, the
  attention core) is recomputed; the MLP half keeps its activations. Costs about a third of a
  block's forward again, frees what attention saves (for retina, its gathered key windows);
- `every_k`: whole blocks, but only every k-th one (blocks 0, k, 2k, ... in module order).
Blocks are counted over the whole model (all scales); shortening / aggregation layers are not
checkpointed.

Two implementations, chosen by the config:
- torch's non-reentrant `torch.utils.checkpoint` (default);
- DeepSpeed's `deepspeed.checkpointing.checkpoint` when `partition_activations` (the kept block
  inputs are split across the tensor-parallel ranks and all-gathered for recomputation) or
  `cpu_checkpointing` (kept inputs moved to host memory) is asked for, after
  `deepspeed.checkpointing.configure(mpu, ...)` with the layout's tensor group.

Where it is applied, not how, avoids DeepSpeed's pipeline traps: the PipelineModule's own
`activation_checkpoint_interval` stays 0, so the embedding (integer tokens in, nothing that
requires grad) is never inside a reentrant checkpoint; only blocks are, and a block's input is
always a float activation that requires grad (the embedding's output, or a received activation).

A checkpointed module keeps its class, parameters and names (checkpoints are unaffected): its
`forward` is replaced on the instance by a `functools.partial` that runs the forward it had
(the class's, or apply_tp's wrapper of it) under checkpointing; a `deepcopy` of the model stays
correct (the partial and the bound method in it are copied with the module).
Recomputation restores the RNG — torch's default generator (both implementations) and the
model-parallel stream of megams' RNG tracker (here) — so dropout draws the same masks twice.
"""
from __future__ import annotations

import functools
from typing import Iterator, List, Optional

import torch
from torch import nn

from megams.models.layers import Block
from megams.parallel.random import get_rng_tracker


def _with_tracker_replay(fn):
    """`fn` such that a second call (the recomputation) sees the RNG tracker as the first did."""
    tracker = get_rng_tracker()
    states = tracker.get_states()
    calls = []

    def run(*args):
        if not calls:
            calls.append(1)
            return fn(*args)
        now = tracker.get_states()
        tracker.set_states(states)
        try:
            return fn(*args)
        finally:
            tracker.set_states(now)

    return run


def _checkpointed_forward(inner, *args, use_deepspeed: bool = False, **kwargs):
    if not torch.is_grad_enabled():  # evaluation: nothing to save, nothing to recompute
        return inner(*args, **kwargs)
    if use_deepspeed:
        import deepspeed
        return deepspeed.checkpointing.checkpoint(_with_tracker_replay(inner), *args, **kwargs)
    return torch.utils.checkpoint.checkpoint(_with_tracker_replay(inner), *args, use_reentrant=False, **kwargs)


def checkpoint_module(module: nn.Module, use_deepspeed: bool = False) -> nn.Module:
    """Recompute `module`'s forward in backward (in place). The forward it had is kept and called
    (with tensor parallelism that is apply_tp's wrapper around the class's forward)."""
    if not is_checkpointed(module):
        module.forward = functools.partial(_checkpointed_forward, module.forward, use_deepspeed=use_deepspeed)
    return module


def is_checkpointed(module: nn.Module) -> bool:
    fwd = module.__dict__.get("forward")
    return isinstance(fwd, functools.partial) and fwd.func is _checkpointed_forward


def _blocks(model: nn.Module) -> Iterator[Block]:
    return (m for m in model.modules() if isinstance(m, Block))


def checkpointed_modules(model: nn.Module, mode: str, every_k: int = 1) -> List[nn.Module]:
    """The modules a mode recomputes: blocks (full, every_k) or their attention (attention)."""
    blocks = list(_blocks(model))
    if mode == "none":
        return []
    if mode == "full":
        return blocks
    if mode == "every_k":
        return blocks[::every_k]
    if mode == "attention":
        return [b.attn for b in blocks]
    raise ValueError(f"unknown activation checkpointing mode {mode!r}")


def configure_deepspeed_checkpointing(ac_cfg, dims=None) -> None:
    """`deepspeed.checkpointing.configure` with the layout's mpu (its tensor group partitions the
    kept activations). Needs torch.distributed initialised, even for one process.

    On a CPU device `cpu_checkpointing` has nothing to move (activations already live in host
    memory) and is not passed on: DeepSpeed 0.19.8 "copies" each kept input to the CPU with
    `.to("cpu")`, which returns the same tensor, then empties that tensor's storage, losing the
    input it meant to keep. The checkpointing itself (and partitioning) stays on."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    on_cpu = get_accelerator().device_name() == "cpu"
    deepspeed.checkpointing.configure(dims.mpu if dims is not None else None,
                                      partition_activations=ac_cfg.partition_activations,
                                      checkpoint_in_cpu=ac_cfg.cpu_checkpointing and not on_cpu)


def apply_ac(model: nn.Module, cfg, dims=None) -> nn.Module:
    """Apply `cfg.parallel.activation_checkpointing` to `model` in place (after apply_tp, before
    the pipeline is built). `dims` gives DeepSpeed's partitioned activations their tensor group."""
    ac = cfg.parallel.activation_checkpointing
    use_ds = ac.partition_activations or ac.cpu_checkpointing
    targets = checkpointed_modules(model, ac.mode, ac.every_k)
    if targets and use_ds:
        configure_deepspeed_checkpointing(ac, dims)
    for m in targets:
        checkpoint_module(m, use_deepspeed=use_ds)
    return model


def describe_ac(model: nn.Module, cfg) -> Optional[str]:
    ac = cfg.parallel.activation_checkpointing
    if ac.mode == "none":
        return None
    n = sum(1 for m in model.modules() if is_checkpointed(m))
    how = "deepspeed" + (" partitioned" if ac.partition_activations else "") + (" cpu" if ac.cpu_checkpointing else "") \
        if (ac.partition_activations or ac.cpu_checkpointing) else "torch non-reentrant"
    return f"[megams] activation checkpointing: mode={ac.mode} ({n} modules recomputed, {how})"

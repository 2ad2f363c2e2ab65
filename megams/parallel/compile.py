"""`training.compile`: torch.compile per transformer Block, applied to a built model from outside
(torchtitan style: the model code knows nothing of it). `apply_compile(model, cfg)`.

Called after tensor parallelism (`apply_tp`) and activation checkpointing (`apply_ac`) and before
the DeepSpeed engine (or the pipeline) is built. What is compiled is always a CLASS's plain forward
function (`Block.forward`, `Attention.forward`, ...), wrapped once in `torch.compile(fn,
dynamic=False)` and shared by every instance: Dynamo caches graphs per code object and guards on
shapes, not on the instance, so the blocks of one shape share one graph (a bottom-up model compiles
one graph per scale length, not one per block). The module's forward becomes
`functools.partial(compiled_fn, module)`, which keeps `deepcopy` correct (the partial is copied
with the module), and its class, parameters and names are unchanged (checkpoints are unaffected).

How it composes with what was applied before (both replace `forward` on the instance by a
`functools.partial` whose LAST positional argument is the forward they wrap):
- activation checkpointing of a whole block (`full`, `every_k`): the checkpoint wrapper stays
  outside, the block's plain forward inside it is compiled (recomputation runs the same graph);
- a block with wrapped submodules -- tensor parallelism (its attention and MLP enter and leave the
  tensor-parallel region with collectives), checkpointed attention (`attention` mode), sequence-
  parallel dropout -- is not compiled whole: the plain forwards of its attention and MLP are
  compiled INSIDE their wrappers, so collectives, checkpointing and RNG forks stay in eager code
  (the norms and residual adds of such a block run eagerly);
- pipeline stages wrap the same block modules (`megams.parallel.pipeline.BlockLayer`), so they run
  the compiled forwards; blocks of other stages (still on the meta device) are left alone.
- retina blocks (RetinaAttention) compile with Inductor's pattern matcher off (see
  `_INDUCTOR_OPTIONS`) and are split in two at one graph break: their index/mask plan is built
  eagerly and cached (`retina_plan` is `torch.compiler.disable`d) and enters the graphs as inputs.
Not with ZeRO stage 3 (its per-submodule parameter gather hooks cannot run inside a compiled
block): the config schema refuses that combination at start-up (`config.compile_with_zero3`).
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from megams.models.layers import Block
from megams.models.retina_attention import RetinaAttention

_COMPILED: Dict[tuple, Callable] = {}  # (a class's forward function, Inductor options) -> torch.compile of it

# Inductor options for the graphs of blocks with these attention classes, where the defaults fail.
# torch 2.13: Inductor's attention-fusion pattern pass (fuse_attention, _sfdp_replacement_29) raises
# "Attempting to broadcast a dimension" on retina's 5-D masked SDPA ([B, H, chunks, C, E]).
_INDUCTOR_OPTIONS = {RetinaAttention: (("pattern_matcher", False),)}


def compiled_function(fn: Callable, options: tuple = ()) -> Callable:
    """`torch.compile(fn, dynamic=False)`, one per function (and Inductor options, as a tuple of
    pairs): every module whose forward is `fn` goes through the same compiled callable (and
    Dynamo's one cache for fn's code)."""
    c = _COMPILED.get((fn, options))
    if c is None:
        c = _COMPILED[(fn, options)] = torch.compile(fn, dynamic=False, options=dict(options) or None)
    return c


@dataclass
class CompileReport:
    whole: int = 0                      # blocks compiled as one graph
    split: int = 0                      # blocks whose attention and MLP were compiled separately
    skipped: List[str] = field(default_factory=list)   # block names left eager, with the reason
    remote: int = 0                     # blocks of other pipeline stages (meta device): not this rank's

    @property
    def compiled(self) -> int:
        return self.whole + self.split

    def describe(self) -> str:
        parts = [f"{self.compiled} transformer blocks compiled (torch.compile per block, dynamic=False)"]
        if self.whole:
            parts.append(f"{self.whole} whole")
        if self.split:
            parts.append(f"{self.split} as attention + MLP graphs (tensor-parallel collectives, checkpointed "
                         "attention or sequence-parallel dropout stay eager around them)")
        if self.remote:
            parts.append(f"{self.remote} on other pipeline stages")
        if self.skipped:
            parts.append(f"{len(self.skipped)} left eager: " + "; ".join(self.skipped))
        return "[megams] training.compile: " + ", ".join(parts)


def _wrapped(module: nn.Module) -> bool:
    """Its forward was replaced on the instance (apply_tp, apply_ac or apply_compile)."""
    return "forward" in module.__dict__


def is_compiled(module: nn.Module) -> bool:
    fwd = module.__dict__.get("forward")
    while isinstance(fwd, functools.partial):
        if fwd.func in _COMPILED.values():
            return True
        fwd = fwd.args[-1] if fwd.args else None
    return False


def _compile_forward(fwd: Callable, module: nn.Module, options: tuple = ()) -> Optional[Callable]:
    """`fwd` (the module's forward, possibly wrapped) with the class's plain forward inside it
    compiled; the wrappers around it are rebuilt unchanged. None: a forward it does not know."""
    if inspect.ismethod(fwd) and fwd.__self__ is module:
        if fwd.__func__ is not type(module).forward:
            return None
        return functools.partial(compiled_function(fwd.__func__, options), module)
    if isinstance(fwd, functools.partial) and fwd.args and callable(fwd.args[-1]):
        if fwd.func in _COMPILED.values():  # already compiled
            return fwd
        inner = _compile_forward(fwd.args[-1], module, options)
        if inner is None:
            return None
        return functools.partial(fwd.func, *fwd.args[:-1], inner, **fwd.keywords)
    return None


def _compile_module(module: nn.Module, options: tuple = ()) -> bool:
    new = _compile_forward(module.forward, module, options)
    if new is None:
        return False
    module.forward = new
    return True


def _on_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def apply_compile(model: nn.Module, cfg) -> CompileReport:
    """Compile `model`'s transformer blocks in place (see the module docstring); a no-op report
    when `cfg.training.compile` is off."""
    report = CompileReport()
    if not cfg.training.compile:
        return report
    # Dynamo keeps up to `recompile_limit` graphs per function (8) and runs eagerly past it: one per
    # scale length x train/eval is what a block needs; a deeper hierarchy must not silently fall back
    dyn = torch._dynamo.config
    dyn.recompile_limit = max(dyn.recompile_limit, 16)
    for name, block in model.named_modules():
        if not isinstance(block, Block):
            continue
        if _on_meta(block):
            report.remote += 1
            continue
        options = _INDUCTOR_OPTIONS.get(type(block.attn), ())
        inner_wrapped = [n for n, m in block.named_modules() if m is not block and _wrapped(m)]
        if not inner_wrapped:
            if _compile_module(block, options):
                report.whole += 1
            else:
                report.skipped.append(f"{name} (unknown forward wrapper)")
            continue
        # wrappers inside the block: compile attention and MLP inside theirs, keep the rest eager
        done = []
        for sub in (block.attn, block.mlp):
            if any(m is not sub and _wrapped(m) for m in sub.modules()):
                continue
            if _compile_module(sub, options if sub is block.attn else ()):
                done.append(sub)
        if done:
            report.split += 1
        else:
            report.skipped.append(f"{name} (wrapped: {', '.join(inner_wrapped)})")
    return report


__all__ = ["apply_compile", "CompileReport", "compiled_function", "is_compiled"]

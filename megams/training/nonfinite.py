"""NaN / inf losses and gradients: detected on any rank, agreed by all, the update skipped.

The guard sits on the torch optimizer itself (the AdamW that DeepSpeed's ZeRO-0/1/2/3, bf16 and
pipeline engines all end up calling with this rank's gradients, already reduced over the data
ranks), so it sees exactly what would be applied:

    guard = NonFiniteGuard()
    loss_fn = guard.watch_loss(loss_fn)     # notes a non-finite loss on this rank
    guard.attach(torch_optimizer)           # before deepspeed.initialize
    ... engine.backward / engine.step ...   # inside the optimizer step: one all-reduce, then
    event = guard.pop()                     #   every rank skips, or every rank updates

On a bad step the optimizer's `step` returns without touching weights or moments (AdamW's own
step count included), so the state stays the last good one; DeepSpeed then zeroes the gradients
and advances its LR scheduler as usual (the schedule follows the step count, the batch is
consumed). The agreement is a sum over all ranks of a one-hot vector, so the event names the
ranks that saw a non-finite loss or gradient. Every rank calls the optimizer's step once per
global step in all DeepSpeed paths megams uses; DeepSpeed's fp16 overflow skip never reaches it
(and is loss scaling, not an invalid loss). ZeRO-3 with several sub-groups per rank decides on
the first sub-group's call and applies the decision to the rest of the step.
"""
from __future__ import annotations

import math
import types
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.distributed as dist


@dataclass
class NonFiniteEvent:
    ranks_loss: List[int] = field(default_factory=list)   # ranks that saw a NaN/inf loss
    ranks_grad: List[int] = field(default_factory=list)   # ranks that saw a NaN/inf gradient

    def describe(self) -> str:
        parts = []
        if self.ranks_loss:
            parts.append(f"loss on rank(s) {', '.join(map(str, self.ranks_loss))}")
        if self.ranks_grad:
            parts.append(f"gradients on rank(s) {', '.join(map(str, self.ranks_grad))}")
        return "non-finite " + " and ".join(parts)


def _nonfinite(tensors) -> bool:
    tensors = [t for t in tensors if t is not None and t.numel()]
    if not tensors:
        return False
    norms = torch._foreach_norm([t.detach() for t in tensors], float("inf"))
    return not bool(torch.isfinite(torch.stack([n.float().cpu() for n in norms])).all())


class NonFiniteGuard:
    def __init__(self):
        self.loss_bad = False
        self._decided: Optional[bool] = None   # this step's decision (ZeRO-3 calls step per sub-group)
        self._event: Optional[NonFiniteEvent] = None
        self.optimizer = None

    # -- what this rank sees ---------------------------------------------------------------------
    def watch_loss(self, loss_fn):
        def watched(*args, **kwargs):
            loss = loss_fn(*args, **kwargs)
            if not bool(torch.isfinite(loss.detach()).all()):
                self.loss_bad = True
            return loss
        watched.__wrapped__ = loss_fn
        return watched

    def note_loss(self, loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            self.loss_bad = True

    # -- the optimizer side ----------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer) -> "NonFiniteGuard":
        original = optimizer.step
        guard = self

        def step(opt, *args, **kwargs):
            if guard._decided is None:
                guard._decided = guard._agree(opt)
            if guard._decided:
                return None  # skipped: weights, moments and AdamW's step count unchanged
            return original(*args, **kwargs)

        optimizer.step = types.MethodType(step, optimizer)  # a bound method, as LR schedulers expect
        self.optimizer = optimizer
        return self

    def _agree(self, optimizer) -> bool:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"]]
        grad_bad = _nonfinite(grads)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world, rank = dist.get_world_size(), dist.get_rank()
            device = "cpu"
            if dist.get_backend() == "nccl":
                device = f"cuda:{torch.cuda.current_device()}"
            flags = torch.zeros(2, world, dtype=torch.int32, device=device)
            flags[0, rank] = int(self.loss_bad)
            flags[1, rank] = int(grad_bad)
            dist.all_reduce(flags)
            flags = flags.cpu()
        else:
            flags = torch.tensor([[int(self.loss_bad)], [int(grad_bad)]])
        self.loss_bad = False
        if int(flags.sum()) == 0:
            return False
        self._event = NonFiniteEvent(ranks_loss=[int(r) for r in torch.nonzero(flags[0]).flatten()],
                                     ranks_grad=[int(r) for r in torch.nonzero(flags[1]).flatten()])
        return True

    def pop(self) -> Optional[NonFiniteEvent]:
        """After the optimizer step: the event of a skipped step (the same on every rank), or None."""
        event, self._event, self._decided = self._event, None, None
        self.loss_bad = False
        return event


def is_finite_number(x) -> bool:
    return x is not None and math.isfinite(float(x))

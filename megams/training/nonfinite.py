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
step count included), so the state stays the last good one, and it raises the optimizer's
`overflow` flag, which DeepSpeed's engine reads: it zeroes the gradients, counts the step in
`engine.skipped_steps` and does not advance the LR scheduler — exactly what DeepSpeed's ZeRO
optimizers do themselves when their own gradient-norm check finds a NaN/inf (they then never call
the torch optimizer). `pop(engine)` reports both kinds: a skip the guard decided, with the ranks
that saw a non-finite loss or gradient (the agreement is a sum over all ranks of a one-hot
vector), and a skip DeepSpeed decided, with the ranks that saw a non-finite loss. The batch is
consumed and the step counter advances either way. Every rank calls the optimizer's step once
per global step in all DeepSpeed paths megams uses (ZeRO-1/2 once per param group, ZeRO-3 once
per sub-group: the first call decides for the step). With fp16, DeepSpeed's overflow skips are
loss scaling at work and are not reported.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.distributed as dist

from megams.distributed import comm


@dataclass
class NonFiniteEvent:
    ranks_loss: List[int] = field(default_factory=list)   # ranks that saw a NaN/inf loss
    ranks_grad: List[int] = field(default_factory=list)   # ranks that saw a NaN/inf gradient
    by_deepspeed: bool = False                             # DeepSpeed's own gradient-norm check skipped it

    def describe(self) -> str:
        if self.by_deepspeed:
            grads = "gradients (found by DeepSpeed's gradient-norm check)"
            if self.ranks_loss:
                return f"non-finite loss on rank(s) {', '.join(map(str, self.ranks_loss))} and {grads}"
            return f"non-finite {grads}"
        if self.ranks_loss and self.ranks_loss == self.ranks_grad:
            return f"non-finite loss and gradients on rank(s) {', '.join(map(str, self.ranks_loss))}"
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
    # L2 norms: NaN/inf if any element is, like DeepSpeed's own gradient-norm check (a sum of squares can
    # also overflow for finite gradients beyond ~1e19, which no sane step has); the fused L2 kernel is
    # ~6x faster on CPU than the inf-norm one
    norms = torch._foreach_norm([t.detach() for t in tensors])
    return not bool(torch.isfinite(torch.stack([n.float() for n in norms]).sum()).cpu())


class NonFiniteGuard:
    def __init__(self, report_engine_skips: bool = True):
        """`report_engine_skips=False` with fp16: DeepSpeed's overflow skips are loss scaling at work."""
        self.loss_bad = False
        self._decided: Optional[bool] = None   # this step's decision (ZeRO-3 calls step per sub-group)
        self._event: Optional[NonFiniteEvent] = None
        self.optimizer = None
        self.report_engine_skips = report_engine_skips
        self._engine_skips = 0

    # -- what this rank sees ---------------------------------------------------------------------
    def watch_loss(self, loss_fn):
        def watched(*args, **kwargs):
            loss = loss_fn(*args, **kwargs)
            self.note_loss(loss)
            return loss
        watched.__wrapped__ = loss_fn
        return watched

    def note_loss(self, loss: torch.Tensor) -> None:
        """Flag a non-finite loss on the device (no host sync per micro-batch: the flag is read once,
        at the optimizer step)."""
        bad = ~torch.isfinite(loss.detach()).all()
        self.loss_bad = bad if self.loss_bad is False else (self.loss_bad | bad)

    # -- the optimizer side ----------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer) -> "NonFiniteGuard":
        original = optimizer.step
        guard = self

        def step(opt, *args, **kwargs):
            if guard._decided is None:
                guard._decided = guard._agree(opt)
            opt.overflow = guard._decided  # read by DeepSpeed's engine when this is its optimizer
            if guard._decided:
                return None  # skipped: weights, moments and AdamW's step count unchanged
            return original(*args, **kwargs)

        optimizer.step = types.MethodType(step, optimizer)  # a bound method, as LR schedulers expect
        optimizer.overflow = False
        self.optimizer = optimizer
        return self

    def _agree(self, optimizer) -> bool:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"]]
        flags = self._gather_flags(self.loss_bad, _nonfinite(grads))
        self.loss_bad = False
        if int(flags.sum()) == 0:
            return False
        self._event = NonFiniteEvent(ranks_loss=_where(flags[0]), ranks_grad=_where(flags[1]))
        return True

    @staticmethod
    def _gather_flags(loss_bad: bool, grad_bad: bool) -> torch.Tensor:
        """[2, world] int: row 0 the ranks with a bad loss, row 1 with bad gradients (collective)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world, rank = dist.get_world_size(), dist.get_rank()
            flags = comm.comm_zeros(2, world, dtype=torch.int32)  # on the device the backend reduces
            flags[0, rank] = int(loss_bad)
            flags[1, rank] = int(grad_bad)
            comm.all_reduce(flags)
            return flags.cpu()
        return torch.tensor([[int(loss_bad)], [int(grad_bad)]])

    def pop(self, engine=None) -> Optional[NonFiniteEvent]:
        """After the optimizer step (every rank): the event of a skipped step, the same on every
        rank, or None. With `engine`, a skip DeepSpeed decided on its own is reported too."""
        event, self._event, self._decided = self._event, None, None
        skipped = int(getattr(engine, "skipped_steps", 0) or 0)
        if event is None and skipped > self._engine_skips and self.report_engine_skips:
            flags = self._gather_flags(self.loss_bad, False)  # every rank saw the same skip: collective is safe
            event = NonFiniteEvent(ranks_loss=_where(flags[0]), by_deepspeed=True)
        self._engine_skips = skipped
        self.loss_bad = False
        return event


def _where(row: torch.Tensor) -> List[int]:
    return [int(r) for r in torch.nonzero(row).flatten()]

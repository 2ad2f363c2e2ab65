"""The communication primitives every tensor-parallel layer is built from, backward next to forward.

Tensor-parallel (TP) region: activations split along the last (hidden) dimension, one part per
tensor rank.
    copy_to_tp        fwd identity              bwd all-reduce        (entering: column-parallel input)
    reduce_from_tp    fwd all-reduce            bwd identity          (leaving: row-parallel output)
    scatter_to_tp     fwd split last dim        bwd all-gather last dim
    gather_from_tp    fwd all-gather last dim   bwd split last dim
Sequence-parallel (SP) region: activations between the TP regions split along the sequence
(`seq_dim`, 1 for megams' [B, T, D] layout) instead of being replicated.
    scatter_to_sp         fwd split seq        bwd all-gather seq
    gather_from_sp        fwd all-gather seq   bwd reduce-scatter seq (consumer is TP-parallel: each
                                               rank holds a partial grad) or split seq (replicated)
    reduce_scatter_to_sp  fwd reduce-scatter seq   bwd all-gather seq

Every function takes the process group explicitly (normally `dims.tp_group`); a group of one,
or None without torch.distributed, makes it the identity. The collectives are the single-tensor
ones of `megams.distributed.comm` (`all_gather_into_tensor` / `reduce_scatter_tensor`, rank-major
along dim 0, so no list of parts and no `torch.cat`), which check that the tensor is on a device
the backend serves; they work on gloo (CPU and CUDA tensors) and NCCL alike.

`count_comm()` counts what these primitives send, for benchmarks:
    with count_comm() as comm:
        loss.backward()
    comm.bytes["all_reduce"], comm.wire_bytes
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from megams.distributed import comm


# communication accounting ------------------------------------------------------------------------
class CommCounter:
    """Per collective kind: calls, and bytes of the full (unsplit) tensor it combined on this rank.

    `wire_bytes` estimates what this rank sent with ring algorithms over a group of n:
    all-reduce 2(n-1)/n x size, all-gather and reduce-scatter (n-1)/n x size of the full tensor.
    """

    def __init__(self):
        self.calls: Counter = Counter()
        self.bytes: Counter = Counter()
        self.wire_bytes = 0.0

    def record(self, kind: str, full_bytes: int, n: int) -> None:
        self.calls[kind] += 1
        self.bytes[kind] += full_bytes
        self.wire_bytes += (2 if kind == "all_reduce" else 1) * (n - 1) / n * full_bytes

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def __repr__(self) -> str:
        return f"CommCounter(calls={dict(self.calls)}, bytes={dict(self.bytes)}, wire_bytes={self.wire_bytes:.0f})"


_counter: Optional[CommCounter] = None


@contextmanager
def count_comm() -> Iterator[CommCounter]:
    """Count every collective issued by megams.parallel inside the block (nests: inner wins)."""
    global _counter
    previous, _counter = _counter, CommCounter()
    try:
        yield _counter
    finally:
        _counter = previous


# raw collectives (no autograd) ---------------------------------------------------------------------------------
def group_size(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def group_rank(group) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


def all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """The all-reduced tensor: a new one, `x` is left alone (`x` itself in a group of one)."""
    n = group_size(group)
    if n == 1:
        return x
    out = x.clone(memory_format=torch.contiguous_format)
    if _counter is not None:
        _counter.record("all_reduce", _nbytes(out), n)
    comm.all_reduce(out, op=op, group=group)
    return out


def split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's equal part of `dim` (no communication)."""
    n = group_size(group)
    if n == 1:
        return x
    if x.size(dim) % n:
        raise ValueError(f"cannot split dim {dim} of size {x.size(dim)} (shape {tuple(x.shape)}) "
                         f"into {n} equal tensor-parallel parts")
    return x.chunk(n, dim)[group_rank(group)].contiguous()


def all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Every rank's `x` concatenated along `dim`, in rank order."""
    n = group_size(group)
    if n == 1:
        return x
    x = x.contiguous()
    dim = dim % x.dim()
    out = x.new_empty((n * x.size(0),) + tuple(x.shape[1:]))
    if _counter is not None:
        _counter.record("all_gather", _nbytes(x) * n, n)
    comm.all_gather_into_tensor(out, x, group=group)
    if dim == 0:
        return out
    # [n*s0, ...] rank-major -> [n, s0, ..., s_dim, ...] -> ranks next to `dim`, merged with it
    return out.view((n,) + tuple(x.shape)).movedim(0, dim).flatten(dim, dim + 1)


def reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's equal part of `dim` of the sum of every rank's `x`."""
    n = group_size(group)
    if n == 1:
        return x
    if x.size(dim) % n:
        raise ValueError(f"cannot reduce-scatter dim {dim} of size {x.size(dim)} (shape {tuple(x.shape)}) "
                         f"over {n} tensor-parallel ranks")
    dim = dim % x.dim()
    if dim == 0:
        inp = x.contiguous()
    else:  # rank r's part of `dim` to the r-th block of dim 0: [s0, .., n*m, ..] -> [n*s0, .., m, ..]
        inp = x.unflatten(dim, (n, x.size(dim) // n)).movedim(dim, 0).flatten(0, 1).contiguous()
    out = inp.new_empty((inp.size(0) // n,) + tuple(inp.shape[1:]))
    if _counter is not None:
        _counter.record("reduce_scatter", _nbytes(x), n)
    comm.reduce_scatter_tensor(out, inp, group=group)
    return out


# tensor-parallel region (last dim) ------------------------------------------------------------------
class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, -1, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return split(grad, -1, ctx.group), None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Forward identity, backward all-reduce: a replicated input consumed by every tensor rank."""
    return _CopyToTP.apply(x, group) if group_size(group) > 1 else x


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Forward all-reduce (sum of partial results), backward identity."""
    return _ReduceFromTP.apply(x, group) if group_size(group) > 1 else x


def scatter_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Forward: keep this rank's part of the last dim; backward: all-gather it."""
    return _ScatterToTP.apply(x, group) if group_size(group) > 1 else x


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Forward: all-gather the last dim; backward: keep this rank's part."""
    return _GatherFromTP.apply(x, group) if group_size(group) > 1 else x


# sequence-parallel region (sequence dim) --------------------------------------------------------------
class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return split(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.dim, ctx.group), None, None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, tp_output_grad):
        ctx.group, ctx.dim, ctx.tp_output_grad = group, dim, tp_output_grad
        return all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.tp_output_grad:
            return reduce_scatter(grad, ctx.dim, ctx.group), None, None, None
        return split(grad, ctx.dim, ctx.group), None, None, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.dim, ctx.group), None, None


def scatter_to_sp(x: torch.Tensor, group, seq_dim: int = 1) -> torch.Tensor:
    """Forward: keep this rank's part of the sequence; backward: all-gather the sequence."""
    return _ScatterToSP.apply(x, group, seq_dim) if group_size(group) > 1 else x


def gather_from_sp(x: torch.Tensor, group, seq_dim: int = 1, tp_output_grad: bool = True) -> torch.Tensor:
    """Forward: all-gather the sequence. Backward: reduce-scatter it when the consumer is
    tensor-parallel (each rank's gradient is a partial sum, e.g. a column-parallel input), else
    keep this rank's part (the consumer is replicated and every rank has the full gradient)."""
    return _GatherFromSP.apply(x, group, seq_dim, tp_output_grad) if group_size(group) > 1 else x


def reduce_scatter_to_sp(x: torch.Tensor, group, seq_dim: int = 1) -> torch.Tensor:
    """Forward: sum partial results and keep this rank's part of the sequence (row-parallel
    output under sequence parallelism); backward: all-gather the sequence."""
    return _ReduceScatterToSP.apply(x, group, seq_dim) if group_size(group) > 1 else x

"""One place that decides where a collective's tensor lives, for every collective megams issues.

NCCL only reduces device tensors ("No backend type associated with device type cpu"); gloo takes
CPU tensors (and CUDA ones). A small control tensor (a flag, a loss sum, a counter) must therefore
be created on the device the group's backend serves, and only the value read back on the host:

    flag = comm_tensor([1.0 if failed else 0.0])            # on comm_device()
    all_reduce(flag)                                        # checks the device, then dist.all_reduce
    failed = flag.item() > 0

`comm_device(group)` asks the process group which device types its backend serves (torch's
`_device_types`, or the backend name) and answers the current CUDA device when the backend cannot
take CPU tensors. Every megams collective on a tensor goes through `all_reduce` / `broadcast` /
`all_gather_into_tensor` / `reduce_scatter_tensor` here (tests/distributed/test_comm_device.py
checks that no module calls torch.distributed collectives directly, and that the tensors handed
to these wrappers are on `comm_device()`).

Timing (`logging.comm_timing`, megams.training.comm_timing): `start_timing()` makes every wrapper
below record, per (op, group size), its calls, wall seconds and full-tensor bytes into a `CommTimer`
(on CUDA the current stream is synchronised before and after, so a call's time is its own); off,
the only cost is one `is None` test per call. Ops are recorded at the call: an `async_op=True`
call counts its launch only (megams issues none).
"""
from __future__ import annotations

import time
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

_CPU = torch.device("cpu")


def _backend_name(group=None) -> str:
    try:
        return str(dist.get_backend(group)).lower()
    except (RuntimeError, ValueError):  # not initialised, or a group this rank is not in
        return "gloo"


def backend_takes_cpu(group=None) -> bool:
    """Whether the group's backend accepts CPU tensors (gloo: yes; nccl, or "cuda:gloo": no)."""
    if not (dist.is_available() and dist.is_initialized()):
        return True
    pg = group if group is not None else _default_group()
    types = getattr(pg, "_device_types", None)  # what the group itself says it serves (torch >= 2.2)
    if types:
        return any(getattr(t, "type", t) == "cpu" for t in types)
    return name_takes_cpu(_backend_name(group))


def _default_group():
    try:
        return dist.distributed_c10d._get_default_group()
    except (RuntimeError, ValueError, AttributeError):
        return None


def name_takes_cpu(name: str) -> bool:
    """From a backend string alone: "gloo" and "cpu:gloo,cuda:nccl" take CPU tensors; "nccl" and
    "cuda:gloo" (a backend bound to the cuda device type only) take device tensors only."""
    name = name.lower().replace(" ", "")
    if ":" in name:
        return any(part.split(":")[0] == "cpu" for part in name.split(","))
    return name not in ("nccl", "xccl", "hccl")


def comm_device(group=None) -> torch.device:
    """The device a small control tensor of a collective on `group` must live on."""
    if backend_takes_cpu(group):
        return _CPU
    # a cuda-only backend; without a CUDA device here (a "cuda:gloo" test group) still answer cuda
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cuda")


def comm_tensor(data: Union[Sequence[float], float, int], dtype: torch.dtype = torch.float64,
                group=None) -> torch.Tensor:
    """A tensor of `data` on `comm_device(group)`."""
    return torch.tensor(data, dtype=dtype, device=comm_device(group))


def comm_zeros(*shape: int, dtype: torch.dtype = torch.float64, group=None) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype, device=comm_device(group))


def to_comm(t: torch.Tensor, group=None) -> torch.Tensor:
    """`t` moved (if needed) to where the group's backend reduces it; the caller keeps the result."""
    dev = comm_device(group)
    return t if t.device == dev else t.to(dev, non_blocking=True)


class CollectiveDeviceError(RuntimeError):
    """A collective was handed a tensor on a device its backend does not serve."""


def check_device(t: torch.Tensor, group=None, what: str = "collective") -> None:
    """Refuse a tensor the backend would refuse, with a message that names the call, on any backend:
    a CPU tensor for NCCL is refused here on a gloo run too, when the group is a cuda-only one."""
    if t.device.type == "cpu" and not backend_takes_cpu(group):
        raise CollectiveDeviceError(f"{what}: tensor on {t.device}, but backend {_backend_name(group)!r} "
                                    f"only reduces {comm_device(group).type} tensors")


# opt-in timing of the collectives below ----------------------------------------------------------
class CommTimer:
    """Per (op, group size): [calls, seconds, bytes of the full tensor combined]. All-gather counts
    its (gathered) output, reduce-scatter its (unscattered) input, the others their tensor."""

    def __init__(self):
        self.records: dict = {}

    def reset(self) -> None:
        self.records = {}

    @property
    def seconds(self) -> float:
        return sum(r[1] for r in self.records.values())

    def add(self, op: str, n: int, seconds: float, full_bytes: int) -> None:
        """One call of `op` over a group of n ranks."""
        r = self.records.setdefault((op, n), [0, 0.0, 0])
        r[0] += 1
        r[1] += seconds
        r[2] += full_bytes

    def run(self, op: str, t: torch.Tensor, full_bytes: int, group, fn):
        sync = t.device.type == "cuda"
        if sync:
            torch.cuda.current_stream(t.device).synchronize()
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            if sync:
                torch.cuda.current_stream(t.device).synchronize()
            self.add(op, world_size(group), time.perf_counter() - t0, full_bytes)


_timer: Optional[CommTimer] = None


def start_timing() -> CommTimer:
    """Time every collective of this module from now on (a fresh timer)."""
    global _timer
    _timer = CommTimer()
    return _timer


def stop_timing() -> None:
    global _timer
    _timer = None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM, group=None, async_op: bool = False):
    check_device(t, group, "all_reduce")
    if _timer is None:
        return dist.all_reduce(t, op=op, group=group, async_op=async_op)
    return _timer.run("all_reduce", t, _nbytes(t), group,
                      lambda: dist.all_reduce(t, op=op, group=group, async_op=async_op))


def broadcast(t: torch.Tensor, src: int, group=None, async_op: bool = False):
    check_device(t, group, "broadcast")
    if _timer is None:
        return dist.broadcast(t, src=src, group=group, async_op=async_op)
    return _timer.run("broadcast", t, _nbytes(t), group,
                      lambda: dist.broadcast(t, src=src, group=group, async_op=async_op))


# torch 2.13 renamed the single-tensor collectives (`*_into_tensor` / `*_tensor` warn as deprecated)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_into_tensor(out: torch.Tensor, t: torch.Tensor, group=None, async_op: bool = False):
    """`out` (world x t.numel(), rank-major along dim 0) gets every rank's `t`."""
    check_device(t, group, "all_gather_into_tensor")
    check_device(out, group, "all_gather_into_tensor (output)")
    if _timer is None:
        return _all_gather_single(out, t, group=group, async_op=async_op)
    return _timer.run("all_gather_into_tensor", out, _nbytes(out), group,
                      lambda: _all_gather_single(out, t, group=group, async_op=async_op))


def reduce_scatter_tensor(out: torch.Tensor, t: torch.Tensor, op=dist.ReduceOp.SUM, group=None,
                          async_op: bool = False):
    """`out` gets this rank's part (along dim 0) of the sum of every rank's `t`."""
    check_device(t, group, "reduce_scatter_tensor")
    check_device(out, group, "reduce_scatter_tensor (output)")
    if _timer is None:
        return _reduce_scatter_single(out, t, op=op, group=group, async_op=async_op)
    return _timer.run("reduce_scatter_tensor", t, _nbytes(t), group,
                      lambda: _reduce_scatter_single(out, t, op=op, group=group, async_op=async_op))


def send(t: torch.Tensor, dst: int, group=None) -> None:
    check_device(t, group, "send")
    if _timer is None:
        dist.send(t, dst=dst, group=group)
    else:
        _timer.run("send", t, _nbytes(t), group, lambda: dist.send(t, dst=dst, group=group))


def recv(t: torch.Tensor, src: int, group=None) -> None:
    check_device(t, group, "recv")
    if _timer is None:
        dist.recv(t, src=src, group=group)
    else:
        _timer.run("recv", t, _nbytes(t), group, lambda: dist.recv(t, src=src, group=group))


def barrier(group=None) -> None:
    """A barrier that works on every backend (NCCL's needs the device set: torch picks it)."""
    dist.barrier(group=group)


def world_size(group: Optional[object] = None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1

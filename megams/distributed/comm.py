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
"""
from __future__ import annotations

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
    name = _backend_name(group)
    # "cpu:gloo,cuda:nccl" takes both; "nccl" or "cuda:gloo" (a backend bound to cuda only) takes device tensors only
    if ":" in name:
        return any(part.split(":")[0].strip() == "cpu" for part in name.split(","))
    return name not in ("nccl", "xccl", "hccl")


def comm_device(group=None) -> torch.device:
    """The device a small control tensor of a collective on `group` must live on."""
    if backend_takes_cpu(group):
        return _CPU
    return torch.device("cuda", torch.cuda.current_device())


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


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM, group=None, async_op: bool = False):
    check_device(t, group, "all_reduce")
    return dist.all_reduce(t, op=op, group=group, async_op=async_op)


def broadcast(t: torch.Tensor, src: int, group=None, async_op: bool = False):
    check_device(t, group, "broadcast")
    return dist.broadcast(t, src=src, group=group, async_op=async_op)


def all_gather_into_tensor(out: torch.Tensor, t: torch.Tensor, group=None, async_op: bool = False):
    check_device(t, group, "all_gather_into_tensor")
    return dist.all_gather_into_tensor(out, t, group=group, async_op=async_op)


def reduce_scatter_tensor(out: torch.Tensor, t: torch.Tensor, op=dist.ReduceOp.SUM, group=None,
                          async_op: bool = False):
    check_device(t, group, "reduce_scatter_tensor")
    return dist.reduce_scatter_tensor(out, t, op=op, group=group, async_op=async_op)


def barrier(group=None) -> None:
    """A barrier that works on every backend (NCCL's needs the device set: torch picks it)."""
    dist.barrier(group=group)


def world_size(group: Optional[object] = None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1

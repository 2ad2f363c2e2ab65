"""Seconds a training step spends in collectives, per rank (`logging.comm_timing: true`; off by default).

Two disjoint sources, so nothing is counted twice:
  * megams' own collectives (tensor-parallel mappings, the pipeline gradient norm, the loss mean, ...)
    all go through `megams.distributed.comm`, which calls torch.distributed directly; its `CommTimer`
    times them (`comm.start_timing()`).
  * DeepSpeed's (data-parallel gradient all-reduce, ZeRO reduce-scatter / all-gather, pipeline
    send / recv, the tied-embedding all-reduce, its gradient norm) go through `deepspeed.comm`, whose
    comms logger (`"comms_logger": {"enabled": true, "prof_all": true}` in the DeepSpeed config) times
    each op. Its per-call latency list is cumulative per op name (DeepSpeed 0.19's timer is never
    reset) and it records no group, so while timing is on two hooks of its op wrapper are wrapped:
    `deepspeed.comm.comm.get_msg_size_from_args` (called with the op's arguments before the op) notes
    the group size and bytes, `comms_logger.append` (called after it) takes the op's own seconds from
    the last entry of its timer (`deepspeed.comm.comm.timers`, reset at every step start).

Per step: `start_step()` before it, `end_step()` after it gives
    {"comm_s": seconds, "comm_ops": {"all_reduce@2": {"calls", "s", "bytes", "wire_bytes"},
                                     "ds:all_reduce@1": {...}, ...}}
keyed by op and group size n ("ds:" for DeepSpeed's).
`bytes`: the full tensors the calls combined (an all-gather's gathered output, a reduce-scatter's
input); `wire_bytes`: what this rank sends (a recv: receives) with ring algorithms over the call's
group of n (`wire_bytes()`; 0 in a group of one). Evaluation and checkpoint collectives happen between steps
and are not counted.
"""
from __future__ import annotations

import inspect


def _ds_comm():
    import deepspeed.comm.comm as dscomm
    return dscomm


def configure_deepspeed_logger(enabled: bool) -> None:
    """DeepSpeed's comms logger is process-global: switch it to this run's setting (a previous run in
    this process may have turned it on)."""
    dscomm = _ds_comm()
    if enabled or dscomm.comms_logger.enabled:
        dscomm.configure(enabled=enabled, prof_all=enabled, verbose=False, debug=False)


def wire_bytes(op: str, full_bytes: float, n: int) -> float:
    """Bytes one rank sends for a collective over n ranks with ring algorithms (NCCL's bus-bandwidth
    convention): all-reduce 2(n-1)/n of the tensor, all-gather / reduce-scatter (n-1)/n of the full
    tensor, a point-to-point send / recv / broadcast the tensor once; nothing in a group of one."""
    if n <= 1 or "barrier" in op:
        return 0.0
    if "all_reduce" in op or "allreduce" in op:
        return 2.0 * (n - 1) / n * full_bytes
    if "all_gather" in op or "allgather" in op or "reduce_scatter" in op:
        return (n - 1) / n * full_bytes
    return float(full_bytes)


def _ds_full_bytes(op: str, msg_size: int, n: int) -> int:
    """DeepSpeed's message size is an all-gather's input shard (its `tensor` argument): the gathered size is n x."""
    return msg_size * n if "all_gather" in op or "allgather" in op else msg_size


class StepCommTiming:
    """Turns timing on (megams' timer, DeepSpeed's logger) until `close()`."""

    def __init__(self):
        from megams.distributed import comm
        self.timer = comm.start_timing()
        configure_deepspeed_logger(True)
        dscomm = _ds_comm()
        self._ds_sizes, self._ds_append = dscomm.get_msg_size_from_args, dscomm.comms_logger.append
        self._signatures: dict = {}
        self._pending: list = []  # (op, n, full bytes) of the DeepSpeed op in flight
        self.ds_timer = comm.CommTimer()  # DeepSpeed's ops, as the comms logger reports them
        dscomm.get_msg_size_from_args = self._note_ds_call
        dscomm.comms_logger.append = self._record_ds_call

    def _note_ds_call(self, func, *args, **kwargs):
        """Called by DeepSpeed's op wrapper with the op's arguments, just before it starts the op's timer."""
        size = self._ds_sizes(func, *args, **kwargs)
        sig = self._signatures.get(func)
        if sig is None:
            sig = self._signatures[func] = inspect.signature(func)
        try:
            group = sig.bind_partial(*args, **kwargs).arguments.get("group")
        except TypeError:
            group = None
        from megams.distributed.comm import world_size
        n = world_size(group)
        self._pending.append((func.__name__, n, _ds_full_bytes(func.__name__, size, n)))
        return size

    def _record_ds_call(self, raw_name, record_name, latency, msg_size):
        """Called by DeepSpeed's op wrapper after the op, its timer stopped: the timer's last entry is this call."""
        self._ds_append(raw_name, record_name, latency, msg_size)
        op, n, full = self._pending.pop() if self._pending else (raw_name, 1, msg_size)
        timer = _ds_comm().timers.timers.get(record_name)
        last = timer.event_timers[-1] if timer is not None and timer.event_timers else 0.0
        secs = float(last) if isinstance(last, (int, float)) else last.get_elapsed_msec() / 1000.0
        self.ds_timer.add(op, n, secs, full)

    def close(self) -> None:
        from megams.distributed import comm
        comm.stop_timing()
        dscomm = _ds_comm()
        if dscomm.get_msg_size_from_args == self._note_ds_call:
            dscomm.get_msg_size_from_args = self._ds_sizes
        if dscomm.comms_logger.__dict__.get("append") == self._record_ds_call:
            del dscomm.comms_logger.append  # the class's method again
        configure_deepspeed_logger(False)

    def start_step(self) -> None:
        self.timer.reset()
        self._pending = []
        self.ds_timer.reset()
        dscomm = _ds_comm()
        dscomm.comms_logger.comms_dict.clear()  # DeepSpeed's own lists grow with every call otherwise
        for t in dscomm.timers.timers.values():
            t.reset()

    def end_step(self) -> dict:
        ops = {}
        for prefix, records in (("", self.timer.records), ("ds:", self.ds_timer.records)):
            for (op, n), (calls, secs, full) in records.items():
                ops[f"{prefix}{op}@{n}"] = {"calls": calls, "s": secs, "bytes": full,
                                            "wire_bytes": wire_bytes(op, full, n)}
        return {"comm_s": sum(r["s"] for r in ops.values()), "comm_ops": ops}


def gather_ranks(mine: dict) -> list:
    """Every rank's `mine` (a small dict), in rank order, on every rank (not timed)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out

"""Putting ZeRO's flat partitions back into named tensors (pure tensor arithmetic, no deepspeed).

ZeRO-1/2: each parameter group is flattened (parameters in `param_shapes` order, each followed by
its alignment padding), padded to a multiple of the data-parallel size and cut into one contiguous
partition per rank: concatenating the ranks' partitions gives the flat group back.
ZeRO-3: every parameter is cut on its own into ceil(numel / dp) elements per rank (the last rank's
part padded); a rank's flat groups hold its part of every parameter, in `param_shapes` order.

The optimizer moments (exp_avg, exp_avg_sq) are laid out exactly like the fp32 master weights, so the
same functions merge them.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import torch

Shapes = Sequence[Dict[str, Sequence[int]]]  # per param group: name -> shape, in flat order


def _numel(shape) -> int:
    return math.prod(int(s) for s in shape)


def merge_zero12(param_shapes: Shapes, partitions: List[List[torch.Tensor]],
                 alignment_paddings: Optional[List[List[int]]] = None, where: str = "") -> Dict[str, torch.Tensor]:
    """partitions[dp_rank][group] -> {name: tensor}."""
    out: Dict[str, torch.Tensor] = OrderedDict()
    dp = len(partitions)
    for g, shapes in enumerate(param_shapes):
        flat = torch.cat([partitions[r][g].reshape(-1) for r in range(dp)])
        pads = alignment_paddings[g] if alignment_paddings is not None else [0] * len(shapes)
        offset = 0
        for (name, shape), pad in zip(shapes.items(), pads):
            n = _numel(shape)
            if offset + n > flat.numel():
                raise ValueError(f"{where}: ZeRO partitions of param group {g} hold {flat.numel()} elements, "
                                 f"fewer than its parameters need")
            out[name] = flat.narrow(0, offset, n).view(*[int(s) for s in shape]).clone()
            offset += n + int(pad)
        # what is left must be the padding that makes the group divisible (DeepSpeed aligns to 2 x dp)
        align = 2 * dp
        if math.ceil(offset / align) != math.ceil(flat.numel() / align):
            raise ValueError(f"{where}: ZeRO partitions of param group {g} hold {flat.numel()} elements, "
                             f"its parameters {offset}")
    return out


def merge_zero3(param_shapes: Shapes, partitions: List[List[torch.Tensor]], where: str = "") -> Dict[str, torch.Tensor]:
    """partitions[dp_rank][group] -> {name: tensor} (each parameter partitioned on its own)."""
    dp = len(partitions)
    flats = [torch.cat([t.reshape(-1) for t in groups]) for groups in partitions]
    out: Dict[str, torch.Tensor] = OrderedDict()
    offset = 0
    for shapes in param_shapes:
        for name, shape in shapes.items():
            n = _numel(shape)
            part = math.ceil(n / dp)
            if offset + part > flats[0].numel():
                raise ValueError(f"{where}: ZeRO-3 partitions hold {flats[0].numel()} elements per rank, fewer "
                                 f"than its parameters need")
            full = torch.cat([f.narrow(0, offset, part) for f in flats])[:n]
            out[name] = full.view(*[int(s) for s in shape]).clone()
            offset += part
    if offset != flats[0].numel():
        raise ValueError(f"{where}: ZeRO-3 partitions hold {flats[0].numel()} elements per rank, its parameters "
                         f"{offset}")
    return out

"""Cutting a model's ordered layers into pipeline stages: by cost, uniformly, or as the user says.

    units = pipeline_units(cfg, seq_len)                  # one per cuttable piece, in execution order
    bounds = partition(units, stages=4, method="cost")    # stage s runs units[bounds[s]:bounds[s+1]]
    print(describe(units, bounds, ...))                   # what runs where, predicted cost and memory

A unit is one record of `megams.models.cost.layer_costs` (a block, a shortening, the embedding,
the head), except that bottom-up's upsamplings are merged into the aggregation that consumes
them. Its cost is its fwd+bwd FLOPs at its own scale: a block on a sequence K times shorter costs
about K times less (its attention K^2 less), which is why cutting multi-scale models by layer
count is badly unbalanced (a coarse block is worth a fraction of a full-resolution one).

Small layers do not run at full speed, though: every layer call pays a fixed price (eager
dispatch of its ~100 forward and backward ops, matmuls too small to fill the machine), which
matters exactly for the coarse layers. `unit_cost` therefore charges each unit its FLOPs as if
it ran on `overhead_rows` more rows (positions x micro-batch) than it does:
    cost = flops x (1 + overhead_rows / (micro_batch x positions at its scale)),
i.e. time = FLOPs / R + a constant per call. `parallel.pipeline_overhead_rows` sets it (0: pure
FLOPs); `python tools/benchmark_pipeline.py calibrate` fits it for a machine from per-unit timings.

Methods:
- `cost`: contiguous stages minimising the most expensive stage by `unit_cost` (exact dynamic
  programme; ties broken towards even stages);
- `uniform`: the same number of transformer blocks per stage (what "split by layers" means in
  DeepSpeed / Megatron); non-block units (embedding, shortening, aggregation, head) stay with
  their neighbours;
- `explicit`: `parallel.pipeline_layout`, the number of units per stage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from megams.config.loader import ConfigError
from megams.config.schema import ModelConfig
from megams.models.cost import layer_costs

METHODS = ("cost", "uniform", "explicit")


@dataclass(frozen=True)
class Unit:
    name: str                # module path of the (first) record: "embed", "scale_blocks.1.3", "aggregate", "head"
    kind: str                # embed | block | shorten | upsample | aggregate | head
    scale: int               # the scale it runs at (0 = full resolution)
    seq_len: int             # positions it runs over, for one sequence
    flops: float             # fwd+bwd FLOPs for one sequence
    activation_bytes: float  # saved-for-backward bytes for one sequence (no activation checkpointing)
    params: int
    sharded_bytes: float = 0.0  # of activation_bytes: split over tensor ranks (megams.models.cost.LayerCost)
    attn_bytes: float = 0.0     # of activation_bytes: saved by attention sublayers
    input_bytes: float = 0.0    # a checkpointed block keeps only this


def pipeline_units(cfg: ModelConfig, seq_len: int, bytes_per_element: int = 4) -> List[Unit]:
    """The units a pipeline may be cut between, in execution order (see the module docstring)."""
    units: List[Unit] = []
    pending_up: list = []  # bottom-up: upsample records, folded into the aggregation that follows
    for c in layer_costs(cfg, seq_len, bytes_per_element):
        if cfg.type == "bottom_up" and c.kind == "upsample":
            pending_up.append(c)
            continue
        group = pending_up + [c] if c.kind == "aggregate" else [c]
        pending_up = [] if c.kind == "aggregate" else pending_up
        units.append(Unit(c.name, c.kind, c.scale, c.seq_len, sum(g.flops for g in group),
                          sum(g.activation_bytes for g in group), sum(g.params for g in group),
                          sum(g.sharded_bytes for g in group), sum(g.attn_bytes for g in group),
                          sum(g.input_bytes for g in group)))
    return units


def boundary_positions(units: Sequence[Unit]) -> List[int]:
    """Positions (for one sequence) of the packed state a stage ending after unit i sends to the next
    (megams.parallel.pipeline.pack: every carried scale concatenated along the sequence); 0 after the
    head. The stack is simulated as the pipeline layers run it: a shortening pushes the fine stream,
    bottom-up's aggregation consumes the stack, a top-down upsampling pops one element."""
    state: List[int] = []
    out = []
    for u in units:
        if u.kind == "embed":
            state = [u.seq_len]
        elif u.kind == "shorten":
            state = [u.seq_len] + state[1:] + [state[0]]
        elif u.kind == "aggregate":
            state = [u.seq_len]
        elif u.kind == "upsample":
            state = [u.seq_len] + state[1:-1]
        elif u.kind == "head":
            state = []
        out.append(sum(state))
    return out


def p2p_bytes(units: Sequence[Unit], bounds: Sequence[int], *, micro_batch: int, d_model: int,
              bytes_per_element: int, tp_partition: int = 1) -> List[float]:
    """Bytes stage s sends to stage s+1 per micro-batch in the forward pass (the backward pass sends
    the same amount back); the last stage sends nothing. With DeepSpeed's `pipe_partitioned` each of
    the `tp_partition` tensor ranks sends 1/tp of it and the receivers all-gather the rest."""
    pos = boundary_positions(units)
    p = len(bounds) - 1
    return [0.0 if s == p - 1 else pos[bounds[s + 1] - 1] * micro_batch * d_model * bytes_per_element / tp_partition
            for s in range(p)]


# --- the per-call overhead, measured per device -------------------------------------------------
# `parallel.pipeline_overhead_rows` when a config does not set it: the value fitted for the device the
# run trains on (`device_kind()`: "cpu", or torch.cuda.get_device_name(), e.g. "NVIDIA H100 80GB HBM3").
# How to measure a device (docs/SCALE.md, "Calibrating the partition cost"): time every pipeline unit
# alone, forward + backward of one micro-batch, on that device (`tools/benchmark_pipeline.py
# calibrate`), fit time = (micro_batch x FLOPs + overhead_rows x FLOPs per row) / R, and add the
# fitted overhead_rows here with the machine, software and date it was measured on. A device not
# listed uses the config default (96) and the partition report says so.
MEASURED_OVERHEAD_ROWS = {
    # shared 2-core AMD EPYC VM, torch 2.13.0+cpu eager, fp32, 1 thread, configs/tiny/bottom_up_30l.yaml
    # micro-batch 4: three fits during one day gave 71, 86 and 139 (docs/PIPELINE.md)
    "cpu": 96,
}


def device_kind(device=None) -> str:
    """The name `MEASURED_OVERHEAD_ROWS` is keyed by: "cpu", or the CUDA device's name."""
    import torch
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type


def overhead_rows(parallel_cfg, kind: Optional[str] = None) -> Tuple[float, str]:
    """(overhead rows, where the value comes from) for `parallel_cfg` (a ParallelConfig) on a device
    of `kind` (default: this process's): the config's value when it sets one, else the measured one."""
    if "pipeline_overhead_rows" in parallel_cfg.model_fields_set:
        return float(parallel_cfg.pipeline_overhead_rows), "parallel.pipeline_overhead_rows"
    kind = device_kind() if kind is None else kind
    if kind in MEASURED_OVERHEAD_ROWS:
        return float(MEASURED_OVERHEAD_ROWS[kind]), f"measured on {kind}"
    return float(parallel_cfg.pipeline_overhead_rows), f"not measured on {kind}: the default"


def unit_cost(u: Unit, micro_batch: int = 1, overhead_rows: float = 0.0) -> float:
    """What a unit costs for one sequence, in FLOP-equivalents (see the module docstring)."""
    return u.flops * (1.0 + overhead_rows / (micro_batch * max(u.seq_len, 1)))


# --- the three methods ----------------------------------------------------------------------------
def balanced_bounds(weights: Sequence[float], stages: int) -> List[int]:
    """Contiguous split of `weights` into `stages` non-empty parts minimising the heaviest part
    (then the sum of squares, i.e. preferring even parts). Returns bounds [0, ..., len(weights)]."""
    n = len(weights)
    if not 1 <= stages <= n:
        raise ConfigError(f"cannot cut {n} pipeline units into {stages} non-empty stages")
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = (math.inf, math.inf)
    # best[k][i]: (max part, sum of squares) splitting the first i units into k parts; cut[k][i]: last cut
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = (0.0, 0.0)
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            for j in range(k - 1, i):
                if best[k - 1][j] == inf:
                    continue
                part = prefix[i] - prefix[j]
                prev_max, prev_sq = best[k - 1][j]
                cand = (max(prev_max, part), prev_sq + part * part)
                if cand < best[k][i]:
                    best[k][i], cut[k][i] = cand, j
    bounds, i = [n], n
    for k in range(stages, 0, -1):
        i = cut[k][i]
        bounds.append(i)
    return bounds[::-1]


def partition(units: Sequence[Unit], stages: int, method: str = "cost",
              layout: Optional[Sequence[int]] = None, micro_batch: int = 1, overhead_rows: float = 0.0) -> List[int]:
    """Stage bounds over `units` (stage s runs units[bounds[s]:bounds[s+1]])."""
    if method == "cost":
        return balanced_bounds([unit_cost(u, micro_batch, overhead_rows) for u in units], stages)
    if method == "uniform":
        # one per block; a tiny weight on the rest keeps them attached to their neighbours deterministically
        return balanced_bounds([1.0 if u.kind == "block" else 1e-3 for u in units], stages)
    if method == "explicit":
        layout = list(layout or [])
        if len(layout) != stages or any(n < 1 for n in layout) or sum(layout) != len(units):
            raise ConfigError(
                f"parallel.pipeline_layout={layout} must give {stages} positive unit counts summing to the "
                f"model's {len(units)} pipeline units: " + ", ".join(u.name for u in units))
        bounds = [0]
        for n in layout:
            bounds.append(bounds[-1] + n)
        return bounds
    raise ConfigError(f"parallel.pipeline_partition={method!r}: expected one of {METHODS}")


# --- what a stage costs ---------------------------------------------------------------------------
@dataclass(frozen=True)
class StageCost:
    first: int
    last: int                # inclusive unit indices
    names: List[str]
    scales: List[int]
    flops: float             # fwd+bwd per sequence
    cost: float              # unit_cost summed: FLOPs plus the per-call overhead
    params: int
    model_bytes: float       # weights + gradients + optimizer states on one rank
    activation_bytes: float  # saved activations of the micro-batches in flight (1F1B), no checkpointing
    in_flight: int
    send_bytes: float = 0.0  # point-to-point: forward activations sent to the next stage per micro-batch
                             # (as many gradient bytes come back); x2 x micro-batches per step


def stage_costs(units: Sequence[Unit], bounds: Sequence[int], *, micro_batch: int = 1, micro_batches: int = 1,
                tied_head_params: int = 0, bytes_per_param: float = 16.0, overhead_rows: float = 0.0,
                d_model: int = 0, bytes_per_element: int = 4, tp_partition: int = 1) -> List[StageCost]:
    """Per stage: FLOPs, parameters, point-to-point volume and a memory estimate. In 1F1B stage s
    keeps the activations of min(m, p - s) micro-batches alive; `tied_head_params` are added to the
    last stage (it holds a copy of the tied embedding); `bytes_per_param` covers weights + grads +
    optimizer states (megams.parallel.memory_plan has the exact per-rank version)."""
    p = len(bounds) - 1
    sends = p2p_bytes(units, bounds, micro_batch=micro_batch, d_model=d_model, bytes_per_element=bytes_per_element,
                      tp_partition=tp_partition)
    out = []
    for s in range(p):
        us = units[bounds[s]:bounds[s + 1]]
        params = sum(u.params for u in us) + (tied_head_params if s == p - 1 and p > 1 else 0)
        in_flight = min(micro_batches, p - s)
        out.append(StageCost(bounds[s], bounds[s + 1] - 1, [u.name for u in us], sorted({u.scale for u in us}),
                             sum(u.flops for u in us), sum(unit_cost(u, micro_batch, overhead_rows) for u in us),
                             params, params * bytes_per_param,
                             sum(u.activation_bytes for u in us) * micro_batch * in_flight, in_flight, sends[s]))
    return out


def _short_names(names: List[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"


def describe(costs: Sequence[StageCost], method: str, micro_batch: int, micro_batches: int) -> str:
    """The start-up report: which units and scales run on which stage, predicted cost and memory."""
    total = sum(c.cost for c in costs) or 1.0
    mib = 1 / 2 ** 20
    lines = [f"[megams] pipeline partition ({method}, {len(costs)} stages, micro-batch {micro_batch} x "
             f"{micro_batches} per step; cost = FLOPs + per-layer overhead, its share predicts the stage's time; "
             f"memory = model states + activations of the micro-batches in flight, without activation checkpointing):"]
    for s, c in enumerate(costs):
        lines.append(
            f"  stage {s}: units {c.first:>2}-{c.last:<2} [{_short_names(c.names)}] scales {c.scales} | "
            f"{c.flops * micro_batch / 1e9:8.3f} GFLOP/micro-batch, cost {100 * c.cost / total:5.1f}% | "
            f"params {c.params / 1e6:7.3f}M | memory ~{(c.model_bytes + c.activation_bytes) * mib:8.1f} MiB "
            f"({c.model_bytes * mib:.1f} model + {c.activation_bytes * mib:.1f} act x{c.in_flight})"
            + (f" | sends {c.send_bytes * mib:.2f} MiB/micro-batch" if c.send_bytes else ""))
    worst = max(c.cost for c in costs)
    lines.append(f"  predicted balance: slowest stage / mean = {worst * len(costs) / total:.3f}")
    return "\n".join(lines)

"""What every rank of a layout holds in device memory, planned without a GPU or real ranks.

    plan = plan_memory(cfg, world_size=512)       # Config -> MemoryPlan (one RolePlan per pipeline stage)
    print(format_plan(plan)); json.dumps(plan.to_dict())

How. For each pipeline stage, rank (dp 0, stage s, tp 0) of the world is built on the meta device
in this process (`megams.parallel.build.build_local_model(cfg, dims, "meta")`) inside torch's fake
process group (`fake_world`): the skeleton is the real one (apply_tp, apply_ac, the pipeline
partition), so parameter shapes, vocabulary padding, the tied embedding on the last stage and which
modules are recomputed are read off it, not re-derived. The tensor ranks of a stage hold shards of
the same shapes (apply_tp splits evenly, or refuses), so one role row stands for all of them.

Model states follow the layouts DeepSpeed 0.19.8 allocates (read from deepspeed/runtime/zero/
stage_1_and_2.py, stage3.py, partition_parameters.py; tests/parallel/test_memory_plan.py holds
parameter and optimizer bytes to what a real engine allocates). `w` is the weight element size:
2 under DeepSpeed bf16/fp16 (`training.precision` bf16 with ZeRO >= 1, or fp16), else 4 (fp32, and
bf16 with ZeRO-0, which megams runs as autocast over fp32 weights). Parameters are taken in the
trainer's two optimizer groups (matrices with weight decay, the rest without), N_g elements each.

    ZeRO-0   weights w*N; grads w*N; torch AdamW exp_avg + exp_avg_sq 8*N (fp16: + fp32 master 4*N)
    ZeRO-1/2 each group flattened into one buffer of A_g = ceil(N_g / (2*dp)) * 2*dp elements
             (nccl_start_alignment_factor 2 x dp): weights w*A_g; master fp32 partition 4*A_g/dp;
             exp_avg + exp_avg_sq 8*A_g/dp. Grads: ZeRO-1 w*N (full, param.grad) + the fp32
             partition 4*A_g/dp; ZeRO-2 w*A_g/dp (grads_in_partition) + 4*A_g/dp.
    ZeRO-3   each parameter partitioned on its own: P_i = ceil(N_i / dp); weights w*P_i, plus the
             full tensor of every "persistent" parameter (N_i <= stage3_param_persistence_threshold,
             1e5: norms, gains); master 4*P_i, moments 8*P_i; grads w*P_i + 4*P_i.

Activations per micro-batch come from `megams.models.cost.layer_costs` (saved-for-backward bytes
per layer, split into the tensor-parallel part and the replicated residual stream) with this
stage's checkpointing read off the skeleton: a recomputed block keeps its input only (split over
the tensor ranks with `partition_activations`, on the host with `cpu_checkpointing`), `attention`
drops the attention sublayer's part. 1F1B keeps min(m, p - s) micro-batches in flight on stage s
(m = gradient accumulation steps); without pipelining one micro-batch's activations live at a time.
`transient` is the largest short-lived allocation on top: one block's recomputed activations in
backward, or the logits' gradient on the last stage.

Communication buffers (DeepSpeed's defaults; megams.training.engine sets no bucket sizes): ZeRO-0's
gradient all-reduce flattens up to 5e8 elements at a time; ZeRO-1/2 one reduce bucket of
reduce_bucket_size 5e8 elements (overlap_comm off); ZeRO-3 two reduce buckets (overlap_comm on)
and up to stage3_max_live_parameters 1e9 gathered parameters; all capped at the stage's element
count. Pipeline stages keep their sent outputs until backward (one per micro-batch in flight) and
one received gradient. Sequence parallelism all-gathers one [micro_batch, seq, d] activation.

Not modelled: the CUDA context and allocator fragmentation (keep ~10% headroom), NCCL's own
buffers, the data loader, DeepSpeed's checkpoint save (transient host copies).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

GiB = 2 ** 30

# DeepSpeed 0.19.8 defaults (deepspeed/runtime/zero/config.py, engine.py)
REDUCE_BUCKET = int(5e8)
ZERO0_ALLREDUCE_BUCKET = int(5e8)   # engine.allreduce_gradients: elements_per_buffer
ZERO3_MAX_LIVE = int(1e9)
ZERO3_PERSISTENCE = int(1e5)
NCCL_START_ALIGNMENT = 2


@dataclass
class RolePlan:
    """One pipeline stage's ranks (all its tensor ranks alike). Byte counts per rank."""
    stage: int
    tp_ranks: List[int]                 # tensor ranks this row stands for
    rank: int                           # the global rank that was built (data rank 0, tensor rank 0)
    units: List[str]
    scales: List[int]
    params: int                         # elements of this rank's parameters (its shard of its stage)
    weights: int
    grads: int
    optimizer: int                      # fp32 master copy + AdamW moments (what DeepSpeed allocates)
    optimizer_detail: Dict[str, int]
    activations_per_micro_batch: int
    in_flight: int
    activations: int                    # per micro-batch x in flight
    transient: int
    comm: Dict[str, int]
    send_bytes_per_micro_batch: int = 0  # point-to-point to the next stage (as much comes back)
    checkpointed: List[str] = field(default_factory=list)

    @property
    def model_states(self) -> int:
        return self.weights + self.grads + self.optimizer

    @property
    def total(self) -> int:
        return self.model_states + self.activations + self.transient + sum(self.comm.values())


@dataclass
class MemoryPlan:
    world_size: int
    dp: int
    tp: int
    pp: int
    zero_stage: int
    precision: str
    mode: str                            # megams.training.engine.precision_mode on a GPU
    weight_bytes: int
    activation_bytes: int
    micro_batch: int
    micro_batches: int                   # per step and data rank (gradient accumulation)
    seq_len: int
    checkpointing: str
    device_memory: int
    roles: List[RolePlan]
    total_params: int                    # the plain model's parameters (tied embedding once)
    overhead_rows: int = 0               # the pipeline partition's per-call overhead ...
    overhead_source: str = ""            # ... and where it comes from

    @property
    def peak(self) -> int:
        return max(r.total for r in self.roles)

    @property
    def fits(self) -> bool:
        return self.peak <= self.device_memory

    def to_dict(self) -> dict:
        d = asdict(self)
        for r, role in zip(d["roles"], self.roles):
            r["model_states"], r["total"] = role.model_states, role.total
        d["peak"], d["fits"] = self.peak, self.fits
        return d


# --- the fake world ---------------------------------------------------------------------------------
@contextlib.contextmanager
def fake_world(rank: int, world_size: int):
    """torch's fake process group as rank `rank` of `world_size` (collectives return at once; new_group
    works), so a rank's part of a large layout can be built in this process."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        raise RuntimeError("the memory planner builds ranks in a fake process group: call it outside torch.distributed")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _planning_cfg(cfg):
    """`cfg` with DeepSpeed's activation-checkpointing options off (they pick the implementation, not
    which modules are recomputed, and configuring DeepSpeed needs a real group); their effect on
    memory is applied by `_unit_activation`."""
    ac = cfg.parallel.activation_checkpointing
    if not (ac.partition_activations or ac.cpu_checkpointing):
        return cfg
    ac2 = ac.model_copy(update={"partition_activations": False, "cpu_checkpointing": False})
    return cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"activation_checkpointing": ac2})})


def build_role(cfg, world_size: int, rank: int, device: str = "meta"):
    """(dims, LocalModel) of `rank`, built in a fake world (see the module docstring)."""
    from megams.parallel.build import build_local_model
    from megams.parallel.dims import build_parallel_dims
    with fake_world(rank, world_size):
        dims = build_parallel_dims(cfg, world_size, rank)
        local = build_local_model(_planning_cfg(cfg) if device == "meta" else cfg, dims, device)
    return dims, local


# --- model states ------------------------------------------------------------------------------------
def optimizer_groups(named_params: Sequence[Tuple[str, object]]) -> List[List[int]]:
    """Element counts of the trainer's two AdamW groups (megams.training.engine.param_groups)."""
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p.numel())
    return [decay, no_decay]


def model_state_bytes(groups: List[List[int]], zero_stage: int, dp: int, w: int, fp16: bool = False) -> dict:
    """Weights, gradients and optimizer states of one rank holding parameter `groups` (element counts
    per parameter, per optimizer group), as DeepSpeed lays them out (module docstring)."""
    n = sum(sum(g) for g in groups)
    if zero_stage == 0:
        master = 4 * n if fp16 else 0
        return {"weights": w * n, "grads": w * n + (4 * n if fp16 else 0),
                "optimizer": {"master": master, "exp_avg": 4 * n, "exp_avg_sq": 4 * n}, "elements": n}
    if zero_stage in (1, 2):
        align = NCCL_START_ALIGNMENT * dp
        A = [math.ceil(sum(g) / align) * align for g in groups if g]
        part = sum(a // dp for a in A)
        grads = (w * n if zero_stage == 1 else w * part) + 4 * part
        return {"weights": w * sum(A), "grads": grads,
                "optimizer": {"master": 4 * part, "exp_avg": 4 * part, "exp_avg_sq": 4 * part}, "elements": n}
    if zero_stage == 3:
        sizes = [x for g in groups for x in g]
        part = sum(math.ceil(x / dp) for x in sizes)
        persistent = sum(x for x in sizes if x <= ZERO3_PERSISTENCE)
        return {"weights": w * (part + persistent), "grads": w * part + 4 * part,
                "optimizer": {"master": 4 * part, "exp_avg": 4 * part, "exp_avg_sq": 4 * part}, "elements": n}
    raise ValueError(f"zero stage {zero_stage}")


# --- activations -------------------------------------------------------------------------------------
def _unit_activation(u, module, ac, tp: int, sp: bool) -> Tuple[float, float, str]:
    """(saved bytes, transient bytes, how) of unit `u` for one sequence on one tensor rank."""
    from megams.parallel.checkpointing import is_checkpointed
    repl = u.activation_bytes - u.sharded_bytes
    base = (repl / tp if sp else repl) + u.sharded_bytes / tp
    if u.kind == "block" and module is not None:
        if is_checkpointed(module):
            kept = 0.0 if ac.cpu_checkpointing else u.input_bytes / (tp if (sp or ac.partition_activations) else 1)
            return kept, base, "full"
        attn = getattr(module, "attn", None)
        if attn is not None and is_checkpointed(attn):
            return base - u.attn_bytes / tp, u.attn_bytes / tp, "attention"
    return base, 0.0, ""


def _element_bytes(mode: str) -> Tuple[int, int]:
    """(weight bytes, activation bytes) per element for a precision mode."""
    if mode in ("ds_bf16", "fp16"):
        return 2, 2
    if mode == "autocast_bf16":
        return 4, 2
    return 4, 4


# --- the plan ----------------------------------------------------------------------------------------
def plan_memory(cfg, world_size: int, device_memory: int = 80 * GiB, device_kind: Optional[str] = None) -> MemoryPlan:
    """Every distinct rank role of `cfg` on `world_size` ranks (module docstring). The pipeline is cut
    as on a device of `device_kind` (its measured `pipeline_overhead_rows`, megams.parallel.partition;
    default: this machine's)."""
    from megams.parallel.partition import overhead_rows
    rows, source = overhead_rows(cfg.parallel, device_kind)
    if "pipeline_overhead_rows" not in cfg.parallel.model_fields_set:
        cfg = cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"pipeline_overhead_rows": int(rows)})})
    import torch
    from megams.config.loader import ConfigError
    from megams.models.cost import param_count
    from megams.parallel.dims import ParallelDims, padded_vocab
    from megams.parallel.partition import p2p_bytes, pipeline_units
    from megams.parallel.pipeline import plan_bytes_per_element, plan_pipeline
    from megams.training.engine import precision_mode

    p, t = cfg.parallel, cfg.training
    probe = ParallelDims(world_size, p.tensor, p.pipeline, 0)  # layout errors before anything is built
    probe.check_model(cfg.model)
    tp, pp, dp = probe.tp_size, probe.pp_size, probe.dp_size
    m = cfg.grad_accum_steps(dp)
    mode = precision_mode(cfg, "cuda")  # planned for a GPU: fp16 allowed
    w, b = _element_bytes(mode)
    ac = p.activation_checkpointing
    mb, T, d = t.micro_batch_size, cfg.data.seq_len, cfg.model.d_model
    units = pipeline_units(cfg.model, T, b)
    vocab_scale = padded_vocab(cfg.model.vocab_size, tp) / cfg.model.vocab_size
    roles: List[RolePlan] = []
    for s in range(pp):
        rank = s * tp
        _, local = build_role(cfg, world_size, rank)
        model = local.module
        if pp > 1:
            plan = plan_pipeline(model, _planning_cfg(cfg), pp, plan_bytes_per_element(cfg))
            bounds = plan.unit_bounds
        else:
            bounds = [0, len(units)]
        us = units[bounds[s]:bounds[s + 1]]
        named = local.local_parameters()
        states = model_state_bytes(optimizer_groups(named), p.zero_stage, dp, w, fp16=mode == "fp16")
        per_seq, transient, ckpt = 0.0, 0.0, []
        for u in us:
            module = _submodule(model, u.name) if u.kind == "block" else None
            saved, trans, how = _unit_activation(u, module, ac, tp, p.sequence_parallel)
            if u.kind == "head":
                saved += u.sharded_bytes / tp * (vocab_scale - 1)
                trans = max(trans, u.sharded_bytes / tp * vocab_scale)  # the logits' gradient
            per_seq += saved
            transient = max(transient, trans)
            if how:
                ckpt.append(f"{u.name}:{how}")
        in_flight = min(m, pp - s) if pp > 1 else 1
        act_mb = int(per_seq * mb)
        n_local = states["elements"]
        comm: Dict[str, int] = {}
        if p.zero_stage == 0:
            comm["grad_allreduce"] = w * min(ZERO0_ALLREDUCE_BUCKET, n_local) if dp > 1 else 0
        elif p.zero_stage in (1, 2):
            comm["reduce_bucket"] = w * min(REDUCE_BUCKET, n_local)
        else:
            comm["reduce_bucket"] = 2 * w * min(REDUCE_BUCKET, n_local)
            comm["gathered_params"] = w * min(ZERO3_MAX_LIVE, n_local)
        send = 0
        if pp > 1 and s < pp - 1:
            full = p2p_bytes(units, bounds, micro_batch=mb, d_model=d, bytes_per_element=b)[s]
            held = full / tp if p.sequence_parallel else full  # SP: this rank's part of the sequence
            comm["p2p"] = int(held * (in_flight + 1))  # outputs kept until their backward + one received gradient
            send = int(full / tp)  # on the wire: pipe_partitioned (or SP) sends 1/tp per tensor rank
        if p.sequence_parallel and tp > 1:
            comm["sp_gather"] = mb * T * d * b
        roles.append(RolePlan(
            stage=s, tp_ranks=list(range(tp)), rank=rank, units=[u.name for u in us],
            scales=sorted({u.scale for u in us}), params=n_local, weights=states["weights"], grads=states["grads"],
            optimizer=sum(states["optimizer"].values()), optimizer_detail=states["optimizer"],
            activations_per_micro_batch=act_mb, in_flight=in_flight, activations=act_mb * in_flight,
            transient=int(transient * mb), comm=comm, send_bytes_per_micro_batch=send, checkpointed=ckpt))
        del local, model
    del torch
    return MemoryPlan(world_size, dp, tp, pp, p.zero_stage, t.precision, mode, w, b, mb, m, T, ac.mode,
                      device_memory, roles, param_count(cfg.model), int(rows), source)


def _submodule(model, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


# --- output ------------------------------------------------------------------------------------------
def _g(x: float, unit: int = GiB) -> str:
    return f"{x / unit:.2f}"


def _short(names: List[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"


def format_plan(plan: MemoryPlan, title: str = "") -> str:
    """The plan as a markdown table (GiB per rank; MiB for plans under 1 GiB), one row per role."""
    ck = plan.checkpointing
    unit, uname = (GiB, "GiB") if plan.peak >= GiB else (2 ** 20, "MiB")
    head = (f"{title + ': ' if title else ''}world {plan.world_size} = dp {plan.dp} x pp {plan.pp} x tp {plan.tp}, "
            f"ZeRO-{plan.zero_stage}, precision {plan.precision} ({plan.mode}: weights {plan.weight_bytes} B, "
            f"activations {plan.activation_bytes} B), micro-batch {plan.micro_batch} x seq {plan.seq_len}, "
            f"{plan.micro_batches} micro-batches per step, activation checkpointing {ck}; "
            + (f"{plan.total_params / 1e9:.2f}B" if plan.total_params >= 1e9 else f"{plan.total_params / 1e6:.2f}M")
            + " parameters")
    cols = ["stage", "tp ranks", "units", "scales", "params/rank", "weights", "grads", "optimizer",
            "act/micro-batch", "in flight", "activations", "transient", "comm buffers", f"total {uname}",
            f"of {plan.device_memory / GiB:.0f} GiB"]
    rows = []
    for r in plan.roles:
        tpr = f"0-{r.tp_ranks[-1]}" if len(r.tp_ranks) > 1 else "0"
        rows.append([str(r.stage), tpr, _short(r.units), ",".join(map(str, r.scales)), f"{r.params / 1e6:.1f}M",
                     _g(r.weights, unit), _g(r.grads, unit), _g(r.optimizer, unit),
                     _g(r.activations_per_micro_batch, unit), str(r.in_flight), _g(r.activations, unit),
                     _g(r.transient, unit), _g(sum(r.comm.values()), unit), _g(r.total, unit),
                     f"{100 * r.total / plan.device_memory:.0f}%"])
    lines = [head, f"(bytes per rank in {uname})", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines += ["", f"peak {_g(plan.peak)} GiB per rank of {plan.device_memory / GiB:.0f} GiB: {verdict} "
              "(not modelled: CUDA context, allocator fragmentation, NCCL buffers: keep ~10% headroom)"]
    if plan.pp > 1:
        sends = ", ".join(f"{r.stage}->{r.stage + 1}: {r.send_bytes_per_micro_batch / 2 ** 20:.1f} MiB"
                          for r in plan.roles[:-1])
        lines.append(f"point-to-point per micro-batch and tensor rank (forward; as much comes back): {sends}")
        lines.append(f"pipeline cut with parallel.pipeline_overhead_rows={plan.overhead_rows} ({plan.overhead_source})")
    return "\n".join(lines)

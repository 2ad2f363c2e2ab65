"""Pipeline parallelism: every model described once as an ordered list of DeepSpeed layer specs,
cut into stages by `megams.parallel.partition`.

    pipe = build_pipeline(model, dims, cfg, loss_fn)    # PipelineModule: deepspeed.initialize(model=pipe, ...)

`model` is the plain model of `megams.models` (after `apply_tp` and `apply_ac`, which change its
modules in place): the specs wrap ITS submodules, so every stage runs exactly the code and the
weights of the single-process model. Each rank builds only its own stage's layers; the rest of the
model is released once the PipelineModule exists (drop your own reference to `model` too).

The layer list (one spec per layer, grouped in the partition's units):

    embed                 TokenEmbedding: tokens -> (x,)     [tied to the head: TiedLayerSpec "embed"]
    vanilla / retina      blocks.i                     (x,) -> (block(x),)
    bottom-up             scale_blocks.0.i, then per scale s = 1..S: shorten.{s-1}, scale_blocks.s.i,
                          then aggregate (all upsamplings + the aggregation), post_blocks.i
    top-down              pre_blocks.i, shorten.0 .. shorten.{S-1}, scale_blocks.S.i, then per
                          s = S-1..0: upsample.s, scale_blocks.s.i
    head                  FinalNorm: (x,) -> norm_f(x); then the LM head (tied: same "embed" module)

Stage state. Inside a stage the layers pass a tuple `(x, *carried)`: `x` is the stream being
transformed, `carried` the earlier-scale tensors a later layer still needs, as a stack:
  - bottom-up: shorten pushes the fine stream, (h_{s-1}, *c) -> (shorten(h_{s-1}), *c, h_{s-1});
    the aggregation consumes the whole stack, (h_S, h_0, .., h_{S-1}) -> (x,);
  - top-down: shorten pushes e_{s-1} the same way; upsample.s pops e_s,
    (g, *c, e_s) -> (e_s + upsample(g, e_s), *c).
The scale of every element after every layer is known statically (`PipelinePlan.scales`).

Stage boundaries. DeepSpeed's contract: a stage sends a tensor or a tuple of tensors; the
receiver marks every floating tensor requires_grad and must send back a gradient for each (a
float tensor whose gradient stays None trips an assertion in the engine; integer tensors travel
without one). With tensor parallelism the engine also cuts the FIRST element into tp pieces
(`pipe_partitioned`/`grad_partitioned`, on by default): each tensor rank sends 1/tp of it and
the receiving tensor ranks all-gather it; every OTHER element must then need no gradient (it
asserts so). Every tensor we carry needs a gradient (the aggregation / upsampling consume it),
so all of them travel in the first element: the stack is concatenated along the sequence
dimension into one [B, sum_s n/K_s, d] tensor (B and d are the same at every scale) and the next
stage splits it back by the statically known scales (`pack` / `unpack`). Nothing else is sent:
no tensor that needs no gradient rides along, so there is nothing to trip the engine.

Under TP (without sequence parallelism) the carried states are the residual streams, outside the
tensor-parallel regions, hence identical on the tensor ranks: DeepSpeed's partitioning of the
packed tensor is exact, and it cuts the bytes each rank sends by tp. With sequence parallelism
the tensor ranks hold DIFFERENT parts of the sequence, so partitioning would mix them: it is
switched off there and each rank sends its own part (`deepspeed_pipeline_config`).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from megams.config.loader import ConfigError
from megams.parallel.mappings import scatter_to_sp
from megams.parallel.partition import Unit, describe, overhead_rows, partition, pipeline_units, stage_costs

Scales = Tuple[int, ...]


# --- the layers (thin wrappers around the plain model's own submodules) ----------------------------
class TokenEmbedding(nn.Module):
    """tokens [B, T] -> (x,). With tied weights the same module (DeepSpeed builds one per stage that
    uses the "embed" key) also holds the head, whose weight is the embedding's: the last stage
    calls it through `head_forward`. Positions and dropout only exist on the first stage's copy."""

    def __init__(self, embed: nn.Module, head: Optional[nn.Module] = None, pos_embed: Optional[nn.Module] = None,
                 drop: Optional[nn.Module] = None, multiple: int = 1):
        super().__init__()
        self.embed, self.head, self.pos_embed, self.drop = embed, head, pos_embed, drop
        self.multiple = multiple

    def forward(self, tokens: torch.Tensor):
        T = tokens.shape[1]
        # sequence parallelism (apply_tp): the embedding reduce-scatters the sequence over the tensor ranks
        sp_group = self.embed.dims.tp_group if getattr(self.embed, "sequence_parallel", False) else None
        multiple = self.multiple * (self.embed.dims.tp_size if sp_group is not None else 1)
        if T % multiple:  # the pipeline runs training-shaped batches: no padding path
            raise ValueError(f"pipeline input length {T} is not a multiple of {multiple} (the total shortening"
                             + (" x the tensor-parallel size, sequence parallelism)" if sp_group is not None else ")"))
        x = self.embed(tokens)
        if self.pos_embed is not None:
            if T > self.pos_embed.num_embeddings:
                raise ValueError(f"input length {T} exceeds model.max_seq_len={self.pos_embed.num_embeddings}")
            pos = self.pos_embed(torch.arange(T, device=tokens.device))[None]
            x = x + (scatter_to_sp(pos, sp_group, 1) if sp_group is not None else pos)
        return (self.drop(x) if self.drop is not None else x,)


def head_forward(module: TokenEmbedding, x: torch.Tensor) -> torch.Tensor:
    """The tied LM head on the last stage (TiedLayerSpec forward_fn)."""
    return module.head(x)


class OutputHead(nn.Module):
    """The untied LM head."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


class BlockLayer(nn.Module):
    """(x, *carried) -> (block(x), *carried)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, state):
        return (self.block(state[0]), *state[1:])


class ShortenLayer(nn.Module):
    """(h, *carried) -> (shorten(h), *carried, h): the fine stream is pushed for later use."""

    def __init__(self, shorten: nn.Module):
        super().__init__()
        self.shorten = shorten

    def forward(self, state):
        return (self.shorten(state[0]), *state[1:], state[0])


class AggregateLayer(nn.Module):
    """Bottom-up: (h_S, h_0, .., h_{S-1}) -> (aggregate(h_0, [upsample_s(h_s, h_0)]),)."""

    def __init__(self, upsample: nn.ModuleList, aggregate: nn.Module):
        super().__init__()
        self.upsample, self.aggregate = upsample, aggregate

    def forward(self, state):
        h0, coarse = state[1], (*state[2:], state[0])  # h_1 .. h_S
        return (self.aggregate(h0, [up(h, h0) for up, h in zip(self.upsample, coarse)]),)


class UpsampleLayer(nn.Module):
    """Top-down: (g, *carried, e_s) -> (e_s + upsample(g, e_s), *carried)."""

    def __init__(self, upsample: nn.Module):
        super().__init__()
        self.upsample = upsample

    def forward(self, state):
        g, e = state[0], state[-1]
        return (e + self.upsample(g, e), *state[1:-1])


class FinalNorm(nn.Module):
    """(x,) -> norm_f(x)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, state):
        return self.norm(state[0])


# --- stage boundaries ---------------------------------------------------------------------------
def scale_factors(shorten_factors: Sequence[int]) -> List[int]:
    """K_s for every scale s (K_0 = 1)."""
    return [math.prod(shorten_factors[:s]) for s in range(len(shorten_factors) + 1)]


def pack(state) -> torch.Tensor:
    """The stage state as ONE tensor for the next stage: concatenated along the sequence."""
    return state[0] if len(state) == 1 else torch.cat(state, dim=1)


def unpack(packed: torch.Tensor, scales: Scales, factors: Sequence[int]) -> tuple:
    """Inverse of `pack` for a state whose elements are at `scales` (K_s from `factors`)."""
    if len(scales) == 1:
        return (packed,)
    K = scale_factors(factors)
    top = K[max(scales)]
    per_coarse = sum(top // K[s] for s in scales)  # positions per coarsest position, over all elements
    if packed.shape[1] % per_coarse:
        raise ValueError(f"packed stage input of length {packed.shape[1]} does not fit scales {scales}")
    q = packed.shape[1] // per_coarse
    return tuple(packed.split([q * top // K[s] for s in scales], dim=1))


# --- the plan: one list of specs, its units and the cut ---------------------------------------------
@dataclass
class PipelinePlan:
    specs: list                 # LayerSpec / TiedLayerSpec, one per layer
    unit_of_layer: List[int]    # the unit (index into `units`) each layer belongs to
    scales: List[Optional[Scales]]  # scales of the state after each layer (None once it is logits)
    units: List[Unit]
    unit_bounds: List[int] = field(default_factory=list)   # stage s runs units[b[s]:b[s+1]]
    layer_bounds: List[int] = field(default_factory=list)  # ... and layers[b[s]:b[s+1]]

    def input_scales(self, stage: int) -> Optional[Scales]:
        return None if stage == 0 else self.scales[self.layer_bounds[stage] - 1]

    def output_scales(self, stage: int) -> Optional[Scales]:
        return self.scales[self.layer_bounds[stage + 1] - 1]


def _layer_list(model) -> List[Tuple[str, object, Optional[Scales]]]:
    """(unit name, spec, scales after) for every layer of `model`, in execution order."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    cfg = model.cfg
    out: List[Tuple[str, object, Optional[Scales]]] = []
    tied = cfg.tie_embeddings
    emb_args = (model.embed, model.head if tied else None, model.pos_embed, model.drop, cfg.total_shortening)
    if tied:
        out.append(("embed", TiedLayerSpec("embed", TokenEmbedding, *emb_args, tied_weight_attr=["embed.weight"]), (0,)))
    else:
        out.append(("embed", LayerSpec(TokenEmbedding, *emb_args), (0,)))
    state: Scales = (0,)

    def blocks(prefix, modules):
        for i, blk in enumerate(modules):
            out.append((f"{prefix}.{i}", LayerSpec(BlockLayer, blk), state))

    if cfg.type in ("vanilla", "retina"):
        blocks("blocks", model.blocks)
    elif cfg.type == "bottom_up":
        blocks("scale_blocks.0", model.scale_blocks[0])
        for s in range(1, len(model.scale_blocks)):
            state = (s, *state[1:], s - 1)
            out.append((f"shorten.{s - 1}", LayerSpec(ShortenLayer, model.shorten[s - 1]), state))
            blocks(f"scale_blocks.{s}", model.scale_blocks[s])
        state = (0,)
        out.append(("aggregate", LayerSpec(AggregateLayer, model.upsample, model.aggregate), state))
        blocks("post_blocks", model.post_blocks)
    elif cfg.type == "top_down":
        blocks("pre_blocks", model.pre_blocks)
        S = len(model.shorten)
        for s in range(1, S + 1):
            state = (s, *state[1:], s - 1)
            out.append((f"shorten.{s - 1}", LayerSpec(ShortenLayer, model.shorten[s - 1]), state))
        for s in reversed(range(S + 1)):
            if s < S:
                state = (s, *state[1:-1])
                out.append((f"upsample.{s}", LayerSpec(UpsampleLayer, model.upsample[s]), state))
            blocks(f"scale_blocks.{s}", model.scale_blocks[s])
    else:
        raise ValueError(f"no pipeline description for model.type {cfg.type!r}")

    out.append(("head", LayerSpec(FinalNorm, model.norm_f), None))
    if tied:
        out.append(("head", TiedLayerSpec("embed", TokenEmbedding, model.embed, model.head,
                                          forward_fn=head_forward, tied_weight_attr=["embed.weight"]), None))
    else:
        out.append(("head", LayerSpec(OutputHead, model.head), None))
    return out


def plan_pipeline(model, cfg, stages: int, bytes_per_element: int = 4) -> PipelinePlan:
    """The layer list of `model`, its units and the cut into `stages` chosen by `cfg.parallel`."""
    units = pipeline_units(cfg.model, cfg.data.seq_len, bytes_per_element)
    layers = _layer_list(model)
    names = [u.name for u in units]
    unit_of_layer, order = [], []
    for name, _, _ in layers:
        if not order or order[-1] != name:
            order.append(name)
        unit_of_layer.append(len(order) - 1)
    if order != names:  # the two descriptions of the model (cost.py and this file) must agree
        raise RuntimeError(f"pipeline layers {order} do not match the cost model's units {names}")
    p = cfg.parallel
    unit_bounds = partition(units, stages, p.pipeline_partition, p.pipeline_layout,
                            micro_batch=cfg.training.micro_batch_size, overhead_rows=overhead_rows(p)[0])
    layer_bounds = [unit_of_layer.index(b) if b < len(units) else len(layers) for b in unit_bounds]
    return PipelinePlan([spec for _, spec, _ in layers], unit_of_layer, [sc for _, _, sc in layers], units,
                        unit_bounds, layer_bounds)


class LocalStage(nn.Module):
    """Layers [start, stop) of a plan run in THIS process, with the boundary packing of a pipeline
    stage: input packed (unless it starts at layer 0), output packed (unless it ends the model).
    What one stage computes, without DeepSpeed (tests, per-stage timing). `tied` shares the tied
    modules between LocalStages of one process, as DeepSpeed shares them within a stage."""

    def __init__(self, plan: PipelinePlan, start: int, stop: int, factors: Sequence[int], tied: Optional[dict] = None):
        super().__init__()
        from deepspeed.pipe import TiedLayerSpec
        self.layers, self.calls = nn.ModuleList(), []
        tied = {} if tied is None else tied
        for spec in plan.specs[start:stop]:
            if isinstance(spec, TiedLayerSpec):
                module = tied.setdefault(spec.key, spec.build())
                call = module if spec.forward_fn is None else functools.partial(spec.forward_fn, module)
            else:
                module = call = spec.build()
            self.layers.append(module)
            self.calls.append(call)
        self.input_scales = plan.scales[start - 1] if start > 0 else None
        self.output_scales = plan.scales[stop - 1] if stop < len(plan.specs) else None
        self.factors = list(factors)

    def forward(self, x):
        if self.input_scales is not None:
            x = unpack(x, self.input_scales, self.factors)
        for call in self.calls:
            x = call(x)
        return pack(x) if self.output_scales is not None else x


def deepspeed_pipeline_config(cfg) -> dict:
    """The `pipeline` section of the DeepSpeed config (see the module docstring on partitioning)."""
    partitioned = cfg.parallel.tensor > 1 and not cfg.parallel.sequence_parallel
    return {"pipe_partitioned": partitioned, "grad_partitioned": partitioned, "activation_checkpoint_interval": 0}


def _pipeline_module_class():
    from deepspeed.pipe import PipelineModule

    class MultiScalePipeline(PipelineModule):
        """DeepSpeed's PipelineModule with our partition and packed multi-scale stage boundaries."""

        def __init__(self, plan: PipelinePlan, topology, loss_fn, factors: Sequence[int]):
            object.__setattr__(self, "_plan", plan)  # read by _partition_layers during super().__init__
            super().__init__(layers=plan.specs, topology=topology, loss_fn=loss_fn, partition_method="megams",
                             activation_checkpoint_interval=0)
            self.factors = list(factors)
            self.input_scales = plan.input_scales(self.stage_id)
            self.output_scales = plan.output_scales(self.stage_id)
            for i, spec in enumerate(self._layer_specs):  # let the other stages' modules be freed
                if not self._local_start <= i < self._local_stop:
                    spec.module_args, spec.module_kwargs = (), {}

        def _partition_layers(self, method="megams"):
            self.parts = list(self._plan.layer_bounds)
            self._set_bounds(start=self.parts[self.stage_id], stop=self.parts[self.stage_id + 1])

        def forward(self, forward_input):
            if self.stage_id > 0:
                forward_input = unpack(forward_input, self.input_scales, self.factors)
            out = super().forward(forward_input)
            return pack(out) if self.stage_id < self.num_stages - 1 else out

    return MultiScalePipeline


def build_pipeline(model, dims, cfg, loss_fn, *, micro_batches: Optional[int] = None, verbose: bool = True):
    """`model` (plain, possibly after apply_tp / apply_ac) as a DeepSpeed PipelineModule over `dims`
    (all ranks call it together). Prints the partition on rank 0 when `verbose`."""
    import deepspeed
    import torch.distributed as dist
    if not deepspeed.comm.is_initialized():  # DeepSpeed's comm layer on top of the existing process group
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    p = cfg.parallel
    if dims.pp_size != p.pipeline:
        raise ConfigError(f"parallel.pipeline={p.pipeline} but the layout has {dims.pp_size} stages")
    plan = plan_pipeline(model, cfg, dims.pp_size, plan_bytes_per_element(cfg))
    if verbose and dims.rank == 0:
        print(partition_report(plan, cfg, dims, micro_batches), flush=True)
    return _pipeline_module_class()(plan, dims.topology(), loss_fn, model_factors(cfg.model))


def plan_bytes_per_element(cfg) -> int:
    """Activation element size the partition is planned with (the same in build_pipeline and in
    megams.parallel.build, which must agree on every stage's layers)."""
    return 2 if cfg.training.precision == "bf16" else 4


def model_factors(model_cfg) -> List[int]:
    """The shortening factors that set the scales' lengths (none for single-scale models)."""
    return list(model_cfg.shorten_factors) if model_cfg.type in ("bottom_up", "top_down") else []


def model_state_bytes_per_param(cfg, dp: int) -> float:
    """Weights + gradients + AdamW states per parameter on one rank, as DeepSpeed holds them (an
    estimate): ZeRO-0 16 bytes; ZeRO-1 keeps full weights and gradients and, per data rank, an fp32
    copy of its partition, its reduced gradient partition and the two Adam moments (so in fp32 it
    only pays off beyond dp = 2, as docs/PIPELINE.md measures); bf16 adds fp32 gradient accumulation."""
    if cfg.parallel.zero_stage == 0:
        return 16.0
    if cfg.training.precision == "bf16":
        return 2 + 2 + 4 + (4 + 8) / dp
    return 4 + 4 + (4 + 4 + 8) / dp


def partition_report(plan: PipelinePlan, cfg, dims, micro_batches: Optional[int] = None) -> str:
    t = cfg.training
    m = micro_batches or cfg.grad_accum_steps(dims.dp_size)
    tied = cfg.model.vocab_size * cfg.model.d_model if cfg.model.tie_embeddings else 0
    costs = stage_costs(plan.units, plan.unit_bounds, micro_batch=t.micro_batch_size, micro_batches=m,
                        tied_head_params=tied, bytes_per_param=model_state_bytes_per_param(cfg, dims.dp_size),
                        overhead_rows=overhead_rows(cfg.parallel)[0], d_model=cfg.model.d_model,
                        bytes_per_element=plan_bytes_per_element(cfg), tp_partition=cfg.parallel.tensor)
    return describe(costs, cfg.parallel.pipeline_partition, t.micro_batch_size, m)

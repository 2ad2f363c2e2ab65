"""The world layout (world = dp x pp x tp) and every process group, built once.

Ranks are ordered as in Megatron: tensor ranks are adjacent (they talk in every layer, so they
should share a node), then pipeline stages, then data-parallel replicas:

    rank = dp_idx * (pp * tp) + pp_idx * tp + tp_idx

World 8 with tp=2, pp=2 (so dp=2): rank 5 is (dp 1, pp 0, tp 1); its tensor group is [4, 5],
its pipeline group [5, 7], its data group [1, 5] and its model-parallel group (tp x pp, the
ranks that together hold one replica of the model) [4, 5, 6, 7].

`ParallelDims(world, tp, pp, rank)` is pure arithmetic until `build_groups()` creates the
process groups (every rank creates every group, in the same order, as torch requires).
`build_parallel_dims(cfg)` does both from a `Config` and checks that the model splits.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch.distributed as dist

from megams.config.loader import ConfigError

# Vocabularies are padded to a multiple of this (times tp when tp does not divide it). Being
# independent of the tensor degree for tp in 1, 2, 4, ..., 128, the padded embedding has the same
# shape in every layout. The padded rows never matter: ids never hit them, and
# `vocab_parallel_cross_entropy(..., vocab_size=V)` leaves their logits out of the softmax, so a
# TP model equals the unpadded plain model exactly, and export crops them (`full_weight()`).
VOCAB_PAD_MULTIPLE = 128

GROUP_KINDS = ("tensor", "pipeline", "data", "model")


def padded_vocab(vocab_size: int, tp: int) -> int:
    """`vocab_size` rounded up to a multiple of 128 (and of `tp`, i.e. of lcm(128, tp))."""
    multiple = math.lcm(VOCAB_PAD_MULTIPLE, tp)
    return -(-vocab_size // multiple) * multiple


def rank_coords(rank: int, tp: int, pp: int) -> Tuple[int, int, int]:
    """Global rank -> (dp_idx, pp_idx, tp_idx)."""
    return rank // (pp * tp), (rank // tp) % pp, rank % tp


def coords_rank(dp_idx: int, pp_idx: int, tp_idx: int, tp: int, pp: int) -> int:
    """(dp_idx, pp_idx, tp_idx) -> global rank."""
    return dp_idx * pp * tp + pp_idx * tp + tp_idx


def layout_groups(world_size: int, tp: int, pp: int) -> Dict[str, List[List[int]]]:
    """Every group of every kind as lists of global ranks, in the order they are created.

    tensor: same (dp, pp); pipeline: same (dp, tp); data: same (pp, tp); model: same dp.
    """
    dp = world_size // (tp * pp)
    r = lambda d, p, t: coords_rank(d, p, t, tp, pp)  # noqa: E731
    return {
        "tensor": [[r(d, p, t) for t in range(tp)] for d in range(dp) for p in range(pp)],
        "pipeline": [[r(d, p, t) for p in range(pp)] for d in range(dp) for t in range(tp)],
        "data": [[r(d, p, t) for d in range(dp)] for p in range(pp) for t in range(tp)],
        "model": [[r(d, p, t) for p in range(pp) for t in range(tp)] for d in range(dp)],
    }


class ParallelDims:
    """One rank's view of the layout: its coordinates, its groups' ranks and (once built) groups."""

    def __init__(self, world_size: int, tp: int = 1, pp: int = 1, rank: int = 0):
        for name, v in (("world size", world_size), ("parallel.tensor", tp), ("parallel.pipeline", pp)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if world_size % (tp * pp):
            raise ConfigError(f"world size {world_size} is not divisible by parallel.tensor={tp} x "
                              f"parallel.pipeline={pp} = {tp * pp}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.world_size, self.rank = world_size, rank
        self.tp_size, self.pp_size, self.dp_size = tp, pp, world_size // (tp * pp)
        self.dp_rank, self.pp_rank, self.tp_rank = rank_coords(rank, tp, pp)
        self.group_ranks: Dict[str, List[int]] = {
            kind: next(g for g in groups if rank in g) for kind, groups in layout_groups(world_size, tp, pp).items()}
        self._groups: Optional[Dict[str, dist.ProcessGroup]] = None

    def __repr__(self) -> str:
        return (f"ParallelDims(world={self.world_size}: dp={self.dp_size} x pp={self.pp_size} x tp={self.tp_size}; "
                f"rank {self.rank} = dp {self.dp_rank}, pp {self.pp_rank}, tp {self.tp_rank})")

    # process groups --------------------------------------------------------------------------
    def build_groups(self) -> "ParallelDims":
        """Create every group of every kind (a collective: all ranks must call it together)."""
        if not dist.is_initialized():
            raise RuntimeError("build_groups() needs torch.distributed to be initialised")
        if (dist.get_world_size(), dist.get_rank()) != (self.world_size, self.rank):
            raise RuntimeError(f"{self!r} does not match the process group (world {dist.get_world_size()}, "
                               f"rank {dist.get_rank()})")
        mine = {}
        for kind, groups in layout_groups(self.world_size, self.tp_size, self.pp_size).items():
            for ranks in groups:
                group = dist.new_group(ranks)  # every rank creates every group, in the same order
                if self.rank in ranks:
                    mine[kind] = group
        self._groups = mine
        return self

    def group(self, kind: str) -> Optional[dist.ProcessGroup]:
        """The process group of `kind` (tensor, pipeline, data, model) this rank belongs to.

        None in a single process without torch.distributed, which megams.parallel reads as
        "a group of one" (no communication).
        """
        if kind not in GROUP_KINDS:
            raise ValueError(f"unknown group kind {kind!r}; expected one of {GROUP_KINDS}")
        if self._groups is None:
            if self.world_size == 1 and not dist.is_initialized():
                return None
            raise RuntimeError(f"process groups of {self!r} are not built: call build_groups() on every rank")
        return self._groups[kind]

    @property
    def tp_group(self):
        return self.group("tensor")

    @property
    def pp_group(self):
        return self.group("pipeline")

    @property
    def dp_group(self):
        return self.group("data")

    @property
    def mp_group(self):
        return self.group("model")

    @property
    def groups(self) -> Dict[str, Optional[dist.ProcessGroup]]:
        return {kind: self.group(kind) for kind in GROUP_KINDS}

    # checks ----------------------------------------------------------------------------------
    def check_model(self, model_cfg) -> None:
        """Refuse a model whose hidden size, heads or MLP hidden size do not split over tp."""
        tp = self.tp_size
        if model_cfg.d_model % tp:
            raise ConfigError(f"model.d_model={model_cfg.d_model} is not divisible by parallel.tensor={tp}")
        if model_cfg.n_heads % tp:
            raise ConfigError(f"model.n_heads={model_cfg.n_heads} is not divisible by parallel.tensor={tp}: "
                              "every tensor rank must hold whole attention heads")
        if model_cfg.ffn_size % tp:
            raise ConfigError(f"MLP hidden size {model_cfg.ffn_size} (model.d_ff) is not divisible by "
                              f"parallel.tensor={tp}")

    # DeepSpeed -------------------------------------------------------------------------------
    @property
    def mpu(self) -> "DeepSpeedMPU":
        """The `mpu` to pass to `deepspeed.initialize(mpu=dims.mpu)` (non-pipeline engine)."""
        return DeepSpeedMPU(self)

    def topology(self):
        """The same layout as a DeepSpeed `ProcessTopology`, for `PipelineModule(topology=...)`.

        DeepSpeed's pipeline engine refuses an mpu and builds its groups from this instead;
        its default `PipeModelDataParallelTopology` orders ranks pipe-outermost, which is not ours.
        """
        from deepspeed.runtime.pipe.topology import ProcessTopology
        return ProcessTopology(axes=["data", "pipe", "model"], dims=[self.dp_size, self.pp_size, self.tp_size])


class DeepSpeedMPU:
    """The layout under the names deepspeed 0.19.8 asks an `mpu` for.

    What DeepSpeed does with it: ZeRO partitions over the data group and sizes batches by the
    data world size; gradient norms (clipping, ZeRO, bf16 optimizer) sum squared norms over the
    model-parallel group, counting a parameter on every rank if it carries
    `tensor_model_parallel=True` (set by megams.parallel.layers on sharded weights) and a
    replicated one only on tensor rank 0; checkpoints are named `mp_rank_{model-parallel rank}`.
    `get_model_parallel_*` is the tp x pp group (as in Megatron), which for the non-pipeline
    engine (pp = 1) is the tensor group. Deliberately absent: `get_sequence_parallel_*` and
    `initialize_sequence_parallel` (those switch on DeepSpeed's Ulysses sequence parallelism,
    which is not Megatron's), and `get_slice_parallel_*` (an older alias DeepSpeed would prefer).
    """

    def __init__(self, dims: ParallelDims):
        self.dims = dims

    def get_tensor_model_parallel_rank(self) -> int:
        return self.dims.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.dims.tp_size

    def get_tensor_model_parallel_group(self):
        return self.dims.tp_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.dims.group_ranks["tensor"][0]

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.dims.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.dims.pp_size

    def get_pipeline_model_parallel_group(self):
        return self.dims.pp_group

    def get_data_parallel_rank(self) -> int:
        return self.dims.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dims.dp_size

    def get_data_parallel_group(self):
        return self.dims.dp_group

    def get_data_parallel_group_ranks(self) -> List[int]:
        return list(self.dims.group_ranks["data"])

    def get_model_parallel_rank(self) -> int:
        return self.dims.pp_rank * self.dims.tp_size + self.dims.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.dims.pp_size * self.dims.tp_size

    def get_model_parallel_group(self):
        return self.dims.mp_group


def build_parallel_dims(cfg, world_size: Optional[int] = None, rank: Optional[int] = None) -> ParallelDims:
    """The layout of a run: `parallel.tensor` x `parallel.pipeline` over the world, model checked,
    groups built when torch.distributed is initialised (world size and rank default to its)."""
    initialized = dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialized else 1
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    dims = ParallelDims(world_size, cfg.parallel.tensor, cfg.parallel.pipeline, rank)
    dims.check_model(cfg.model)
    if cfg.parallel.sequence_parallel and cfg.data.seq_len % dims.tp_size:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} is not divisible by parallel.tensor={dims.tp_size} "
                          "(parallel.sequence_parallel splits the sequence over the tensor ranks)")
    if initialized:
        dims.build_groups()
    return dims

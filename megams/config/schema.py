"""The one typed configuration schema of megams.

Every knob of a run lives here, grouped by concern (model, data, parallel, optimizer, training,
checkpoint, logging). YAML files fill it, `--set key.sub=value` overrides patch it, and pydantic
validates it: unknown keys, wrong types and impossible values fail at start-up with the field's
dotted path and what was expected (see `megams.config.loader`).
"""
from __future__ import annotations

import math
from typing import List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ModelType = Literal["vanilla", "bottom_up", "top_down", "retina"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """Architecture (see docs/MODELS.md for every option and its default)."""

    type: ModelType = "vanilla"
    vocab_size: int = Field(256, gt=0)
    d_model: int = Field(128, gt=0)
    n_heads: int = Field(4, gt=0)
    d_ff: Optional[int] = Field(None, gt=0, description="MLP hidden size; default 4*d_model (gelu) or 8/3*d_model rounded to 64 (swiglu)")
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: Literal["gelu", "swiglu"] = "gelu"
    positions: Literal["rotary", "learned"] = "rotary"
    max_seq_len: int = Field(4096, gt=0, description="table size of learned positions; inference longer than this is refused")
    rotary_base: float = Field(10000.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    fused_qkv: bool = Field(True, description="self-attention projects q, k, v in one [3d, d] matmul of the three "
                                              "weights (each rank's own head shard under tensor parallelism); "
                                              "the parameters stay wq / wk / wv, so checkpoints are the same")
    tie_embeddings: bool = True
    init_std: float = Field(0.02, gt=0)
    norm_eps: float = Field(1e-5, gt=0)

    # vanilla / retina: number of (full-resolution) blocks
    n_layers: int = Field(4, ge=0)

    # bottom-up / top-down: the scales
    shorten_factors: List[int] = Field(default_factory=lambda: [4, 4], description="k_1..k_S, one per shortening")
    layers_per_scale: List[int] = Field(default_factory=lambda: [1, 2, 2], description="n_0..n_S, indexed by scale")
    n_post: int = Field(1, ge=0, description="bottom-up: full-resolution blocks after the aggregation layer")
    n_pre: int = Field(0, ge=0, description="top-down: full-resolution blocks before the first shortening")
    pooling: Optional[Literal["avg", "linear", "attention"]] = Field(
        None, description="shortening pool; default avg (bottom-up) / linear (top-down)")
    shift_pad: Literal["zeros", "learned"] = "zeros"
    upsampling: Literal["repeat", "linear", "attention"] = Field(
        "repeat", description="attention: repeat + each fine position attends (from the fine stream) to the coarse "
                              "positions it may causally see (Hourglass-style)")
    aggregation: Literal["sum", "attention"] = "attention"
    scale_merge: Literal["auto", "norm", "gate", "none"] = Field(
        "auto", description="how a coarse stream is added to a finer one (top-down e_s + merge(upsample(g)), "
                            "bottom-up sum aggregation): norm = a norm whose gain starts at init_std, gate = a "
                            "zero-initialised per-channel gate, none = the raw sum; auto (default) = norm, as "
                            "measured in docs/RESULTS.md §1 (issue 14): without it top-down does not learn and "
                            "bottom-up's sum aggregation diverges at its best learning rate")

    # retina
    retina_factors: List[int] = Field(default_factory=lambda: [4, 16], description="K_1..K_S pool sizes (absolute, increasing)")
    retina_windows: List[int] = Field(default_factory=lambda: [64, 32, 32], description="W_0 (tokens), W_1..W_S (pooled blocks)")
    retina_last_window: Literal["finite", "all"] = "finite"
    retina_pool: Literal["avg"] = "avg"
    retina_chunk_size: Optional[int] = Field(
        None, gt=0, description="queries per chunk of the windowed retina attention (memory/speed knob, not "
                                "semantics); default W_0")

    @field_validator("shorten_factors", "retina_factors")
    @classmethod
    def _factors(cls, v):
        if any(k < 2 for k in v):
            raise ValueError(f"every factor must be an integer >= 2, got {v}")
        return v

    @field_validator("layers_per_scale")
    @classmethod
    def _layers(cls, v):
        if any(n < 0 for n in v):
            raise ValueError(f"layer counts must be >= 0, got {v}")
        return v

    @field_validator("retina_windows")
    @classmethod
    def _windows(cls, v):
        if any(w < 1 for w in v):
            raise ValueError(f"every window must be >= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        hd = self.d_model // self.n_heads
        if self.positions == "rotary" and hd % 2:
            raise ValueError(f"rotary positions need an even head dim, got d_model/n_heads={hd}")
        if self.type in ("bottom_up", "top_down"):
            if not self.shorten_factors:
                raise ValueError("shorten_factors must name at least one shortening for a multi-scale model")
            if len(self.layers_per_scale) != len(self.shorten_factors) + 1:
                raise ValueError(
                    f"layers_per_scale needs one count per scale (len(shorten_factors)+1 = "
                    f"{len(self.shorten_factors) + 1}), got {self.layers_per_scale}")
        if self.scale_merge == "auto":  # resolved once, so every consumer (model, cost, checkpoints) sees it
            object.__setattr__(self, "scale_merge", "norm")
        if self.type == "retina":
            f = self.retina_factors
            if len(self.retina_windows) != len(f) + 1:
                raise ValueError(f"retina_windows needs W_0..W_S (len(retina_factors)+1 = {len(f) + 1} values), got {self.retina_windows}")
            for a, b in zip(f, f[1:]):
                if b <= a or b % a:
                    raise ValueError(f"retina_factors must increase, each dividing the next, got {f}")
        return self

    # derived -------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_size(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "swiglu":
            return 64 * math.ceil(8 * self.d_model / 3 / 64)
        return 4 * self.d_model

    @property
    def pooling_kind(self) -> str:
        if self.pooling is not None:
            return self.pooling
        return "linear" if self.type == "top_down" else "avg"

    @property
    def total_shortening(self) -> int:
        """K_S: the length a training sequence must be divisible by."""
        if self.type in ("bottom_up", "top_down"):
            return math.prod(self.shorten_factors)
        return 1


class BlendSource(_Strict):
    path: str
    weight: float = Field(1.0, gt=0)


class DataConfig(_Strict):
    """Where the tokens come from. `path: null` = the built-in corpus (ships with Python)."""

    path: Optional[str] = Field(None, description="text / JSONL file, or indexed dataset prefix (PREFIX.bin + PREFIX.idx); null = built-in corpus")
    blend: List[BlendSource] = Field(default_factory=list, description="weighted blend of several sources (overrides path)")
    valid_path: Optional[str] = Field(None, description="separate validation source; default: carve from split")
    tokenizer: str = Field("byte", description="'byte' (vocab 256, no training) or a sentencepiece .model file")
    seq_len: int = Field(256, gt=0)
    split: List[float] = Field(default_factory=lambda: [0.9, 0.1, 0.0], description="train/valid/test fractions of the token stream")
    append_eod: bool = True
    doc_sep: Literal["blank_line", "line"] = Field("blank_line", description="text files: documents are separated by blank lines, or one per line")
    text_key: str = Field("text", min_length=1, description="JSONL files: the key holding each document's text")
    cache_dir: str = Field(".cache/megams-data", description="where text sources are tokenized to indexed datasets")
    num_workers: int = Field(2, ge=1)
    prefetch: int = Field(2, ge=0, description="steps of batches built ahead by a background thread (pinned "
                          "host memory, non-blocking copies on a side stream on CUDA); 0 = off, built in the loop")

    @field_validator("split")
    @classmethod
    def _split(cls, v):
        if len(v) != 3 or any(x < 0 for x in v) or sum(v) <= 0 or v[0] <= 0:
            raise ValueError(f"split must be three non-negative fractions [train, valid, test] with train > 0, got {v}")
        return v


class ActivationCheckpointConfig(_Strict):
    """What to recompute in backward (megams.parallel.checkpointing): `full` every transformer block,
    `attention` every block's attention sublayer, `every_k` every k-th block. The two DeepSpeed
    options switch to deepspeed.checkpointing (split the kept inputs over the tensor ranks / keep
    them in host memory)."""

    mode: Literal["none", "full", "attention", "every_k"] = "none"
    every_k: int = Field(2, ge=1)
    partition_activations: bool = False
    cpu_checkpointing: bool = False

    @model_validator(mode="after")
    def _needs_mode(self):
        for flag in ("partition_activations", "cpu_checkpointing"):
            if getattr(self, flag) and self.mode == "none":
                raise ValueError(f"{flag}=true needs a checkpointing mode (full, attention or every_k), got mode=none")
        return self


class ParallelConfig(_Strict):
    tensor: int = Field(1, ge=1)
    pipeline: int = Field(1, ge=1)
    zero_stage: int = Field(0, ge=0, le=3)
    sequence_parallel: bool = False
    pipeline_partition: Literal["cost", "uniform", "explicit"] = "cost"
    pipeline_layout: List[int] = Field(default_factory=list, description="explicit: pipeline units per stage (the "
                                       "units the start-up partition report lists: embed, blocks, shortenings, ..., head)")
    pipeline_overhead_rows: int = Field(
        96, ge=0, description="cost partition: charge every layer call as if it ran on this many more rows "
                              "(positions x micro-batch): the fixed price of a small layer; 0 = pure FLOPs. "
                              "Fit it for a machine with tools/benchmark_pipeline.py calibrate (96: a 2-core CPU)")
    activation_checkpointing: ActivationCheckpointConfig = Field(default_factory=ActivationCheckpointConfig)

    @model_validator(mode="after")
    def _zero_pipe(self):
        if self.pipeline > 1 and self.zero_stage > 1:
            raise ValueError(f"zero_stage={self.zero_stage} with pipeline={self.pipeline}: DeepSpeed refuses ZeRO-2/3 "
                             "with pipeline parallelism; use zero_stage 0 or 1")
        return self

    @model_validator(mode="after")
    def _layout(self):
        if self.pipeline > 1 and self.pipeline_partition == "explicit" and len(self.pipeline_layout) != self.pipeline:
            raise ValueError(f"pipeline_partition=explicit needs pipeline_layout with one unit count per stage "
                             f"({self.pipeline}), got {self.pipeline_layout}")
        if self.pipeline_layout and self.pipeline_partition != "explicit":
            raise ValueError(f"pipeline_layout={self.pipeline_layout} is only used with pipeline_partition=explicit "
                             f"(got {self.pipeline_partition})")
        if any(n < 1 for n in self.pipeline_layout):
            raise ValueError(f"pipeline_layout entries must be >= 1, got {self.pipeline_layout}")
        if self.activation_checkpointing.partition_activations and self.sequence_parallel:
            raise ValueError("activation_checkpointing.partition_activations with sequence_parallel: the tensor ranks "
                             "hold different parts of the sequence, there is no replicated activation to partition")
        return self


class OptimizerConfig(_Strict):
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    betas: List[float] = Field(default_factory=lambda: [0.9, 0.95])
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    warmup: float = Field(0.05, ge=0, description="< 1: fraction of max_steps; >= 1: steps (clamped to max_steps)")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v):
        if len(v) != 2 or not all(0 <= b < 1 for b in v):
            raise ValueError(f"betas must be two numbers in [0, 1), got {v}")
        return v


class TrainingConfig(_Strict):
    max_steps: int = Field(100, gt=0)
    micro_batch_size: int = Field(8, gt=0)
    global_batch_size: int = Field(8, gt=0)
    seed: int = 1234
    run_dir: str = "runs/default"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dist_backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="auto: nccl on CUDA, gloo on CPU. gloo on CUDA lets several ranks share one GPU "
        "(local rank r uses device r mod device_count), e.g. tp=2 on a one-GPU machine; NCCL refuses that")
    eval_interval: int = Field(100, ge=0, description="0: evaluate only at the end")
    eval_batches: int = Field(8, gt=0)
    compile: bool = Field(False, description="torch.compile every transformer Block (dynamic=False; blocks of one "
                          "shape share a graph), after tensor parallelism and activation checkpointing "
                          "(megams.parallel.compile.apply_compile); not with parallel.zero_stage=3")
    fused_kernels: Literal["auto", "apex", "torch"] = Field(
        "auto", description="auto: NVIDIA apex's fused norms and Adam when importable on CUDA, else torch's "
        "(fused AdamW on CUDA); apex: require NVIDIA apex (error if absent); torch: never apex")
    exit_interval: int = Field(0, ge=0, description="stop (with a checkpoint) once the global step is a multiple of "
                               "this, like Megatron's --exit-interval; 0 = run to max_steps. For time-limited jobs.")
    on_nonfinite: Literal["skip", "stop"] = Field(
        "skip", description="a NaN/inf loss or gradient on any rank: skip the update (weights and optimizer state "
        "unchanged, the batch consumed, counted in metrics.jsonl) or stop (exit code 4) after saving the last good "
        "state to checkpoints/nonfinite_step_N")
    max_consecutive_nonfinite: int = Field(5, ge=1, description="with on_nonfinite=skip: stop like on_nonfinite=stop "
                                           "once this many steps in a row were skipped")
    collective_timeout_s: float = Field(600.0, gt=0, description="a collective that waits longer ends the run "
                                        "(exit code 5) with a message naming the ranks that stopped progressing")


class CheckpointConfig(_Strict):
    interval: int = Field(100, ge=0, description="0: only the final step")
    keep_last: int = Field(2, ge=1)
    resume: bool = True
    load_from: Optional[str] = Field(None, description="start from this checkpoint (another layout or a plain-torch directory)")
    verify: Literal["checksum", "size"] = Field(
        "checksum", description="before loading, check every file against the manifest: sha256 + size, or size only "
        "(faster for huge checkpoints); files not in the manifest are refused either way")


class LoggingConfig(_Strict):
    interval: int = Field(10, ge=1)
    tensorboard: bool = False
    progress_bar: bool = True
    comm_timing: bool = Field(False, description="time every collective of a training step (megams' own "
                              "and DeepSpeed's, through its comms logger): each logged step's record gets comm_s, "
                              "comm_ops (calls, seconds, bytes per op) and ranks (every rank's comm_s, step time "
                              "and peak memory). On CUDA it synchronises around each collective: off for throughput runs")


class Config(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _cross(self):
        K = self.model.total_shortening
        if self.data.seq_len % K:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} is not divisible by the product of "
                f"model.shorten_factors {self.model.shorten_factors} = {K}")
        if self.model.positions == "learned" and self.data.seq_len > self.model.max_seq_len:
            raise ValueError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len} (learned positions)")
        if self.data.tokenizer == "byte" and self.model.vocab_size < 256:
            raise ValueError(f"model.vocab_size={self.model.vocab_size} is smaller than the byte tokenizer's 256")
        mb, gb = self.training.micro_batch_size, self.training.global_batch_size
        if gb % mb:
            raise ValueError(f"training.global_batch_size={gb} is not a multiple of training.micro_batch_size={mb}")
        if self.training.compile and self.parallel.zero_stage == 3:
            raise ValueError("training.compile=true with parallel.zero_stage=3: ZeRO-3 gathers parameters in hooks "
                             "per submodule, which cannot run inside a compiled block; use zero_stage <= 2 or "
                             "training.compile=false")
        return self

    def grad_accum_steps(self, dp_size: int) -> int:
        """Gradient accumulation = global batch / (micro batch x data-parallel size)."""
        mb, gb = self.training.micro_batch_size, self.training.global_batch_size
        if gb % (mb * dp_size):
            from megams.config.loader import ConfigError  # a user error (the loader imports this module)
            raise ConfigError(
                f"training.global_batch_size={gb} is not divisible by training.micro_batch_size={mb} x "
                f"data-parallel size {dp_size} = {mb * dp_size}")
        return gb // (mb * dp_size)

    def warmup_steps(self) -> int:
        w = self.optimizer.warmup
        steps = int(round(w * self.training.max_steps)) if w < 1 else int(w)
        return max(0, min(steps, self.training.max_steps - 1))

"""Read a megams training checkpoint of any layout into full, plain-model tensors.

    state = read_checkpoint("runs/x")                 # run dir -> its latest checkpoint
    state = read_checkpoint("runs/x/checkpoints/step_00000100", optimizer=True)
    state.params      {plain name: fp32 tensor of the full shape}  (tied aliases once)
    state.optimizer   {plain name: {"exp_avg": ..., "exp_avg_sq": ...}} or None
    state.step, state.adam_step, state.meta, state.model_config, state.report

Where the weights come from, by layout (`megams.json` "layout" and "parameters", see layout.py):
- ZeRO-0: the module in `mp_rank_XX_model_states.pt` (fp32; bf16 with ZeRO-0 trains fp32 weights
  under autocast), the torch AdamW state next to it;
- ZeRO-1/2: the fp32 master partitions and moments in `[bf16_]zero_pp_rank_D_mp_rank_XX_optim_states.pt`
  of every data-parallel rank D, flattened in the order of `param_shapes` (zero.merge_zero12);
- ZeRO-3: the same from `zero_pp_rank_D_mp_rank_XX_*` (each parameter partitioned on its own);
- pipeline stages: the module in `layer_LL-model_TT-model_states.pt`, master weights as above;
- tensor-parallel shards (mp ranks) are concatenated along their `partition_dim` and cropped to the
  plain shape (vocabulary padding); replicated parameters are taken from tensor rank 0.
Every file is checked before anything is merged: a missing rank or a truncated shard fails with a
message that names the file.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from megams.checkpoint.errors import CheckpointError
from megams.checkpoint.manifest import META_FILE
from megams.checkpoint.serialization import DeepSpeedObject

FORMAT = "megams-checkpoint/2"
FORMATS = ("megams-checkpoint/1", FORMAT)  # /1: before the manifest (files then only pass the pickle scan)


@dataclass
class TrainingState:
    path: str                                   # the checkpoint directory
    meta: dict                                  # megams.json
    params: Dict[str, torch.Tensor]             # plain name -> full fp32 tensor
    optimizer: Optional[Dict[str, Dict[str, torch.Tensor]]] = None
    adam_step: Optional[int] = None             # the optimizer's own step count (bias correction)
    files: List[str] = field(default_factory=list)
    report: List[str] = field(default_factory=list)

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def model_config(self) -> dict:
        return self.meta["config"]["model"]

    @property
    def layout(self) -> dict:
        return self.meta["layout"]


# --- finding the checkpoint -------------------------------------------------------------------
def not_a_checkpoint(path: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a megams checkpoint (expected a run directory with checkpoints/latest "
                           f"or a checkpoint directory holding {META_FILE})")


def resolve_checkpoint(path: str) -> str:
    """A run directory -> its latest complete checkpoint; a checkpoint directory -> itself."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such directory")
    if os.path.isfile(os.path.join(path, META_FILE)):
        return path
    root = os.path.join(path, "checkpoints")
    if os.path.isdir(root):
        pointer = os.path.join(root, "latest")
        if not os.path.isfile(pointer):
            raise CheckpointError(f"{path}: run directory without a complete checkpoint (no checkpoints/latest)")
        with open(pointer) as f:
            tag = f.read().strip()
        ckpt = os.path.join(root, tag)
        if not os.path.isfile(os.path.join(ckpt, META_FILE)):
            raise CheckpointError(f"{path}: checkpoints/latest names {tag}, which has no {META_FILE}")
        return ckpt
    raise not_a_checkpoint(path)


def read_meta(ckpt: str) -> dict:
    meta_path = os.path.join(ckpt, META_FILE)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path}: not a megams checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") not in FORMATS:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{meta_path}: not a megams checkpoint (format {got!r}, expected one of "
                              f"{', '.join(FORMATS)})")
    for key in ("step", "config", "layout"):
        if key not in meta:
            raise CheckpointError(f"{meta_path}: not a megams checkpoint (no {key!r} entry)")
    return meta


def parameter_record(meta: dict) -> dict:
    """meta["parameters"], or (checkpoints written before it existed, tp = pp = 1) rebuilt from the config."""
    if "parameters" in meta:
        return meta["parameters"]
    lay = meta["layout"]
    if lay.get("tp", 1) > 1 or lay.get("pp", 1) > 1:
        raise CheckpointError("megams.json has no 'parameters' record, which tensor/pipeline-parallel checkpoints "
                              "need (written by an older megams)")
    from megams.checkpoint.layout import optimizer_groups, plain_parameters
    from megams.config.schema import ModelConfig
    from megams.models import build_model
    model = build_model(ModelConfig.model_validate(meta["config"]["model"]), device="meta")
    plain = plain_parameters(model)
    params = [[n, n, s, None, None] for n, s in plain["plain"].items()]
    return {"version": 0, **plain,
            "mp_ranks": [{"mp_rank": 0, "pp": 0, "tp": 0, "params": params, "groups": optimizer_groups(model)}]}


# --- which files a layout has ------------------------------------------------------------------
class _Files:
    def __init__(self, ckpt: str, meta: dict, record: dict):
        self.ckpt, self.meta, self.record = ckpt, meta, record
        lay = meta["layout"]
        self.dp, self.tp, self.pp = int(lay["dp"]), int(lay.get("tp", 1)), int(lay.get("pp", 1))
        self.zero = int(lay["zero_stage"])
        self.bf16 = lay.get("precision") == "bf16" and self.zero >= 1  # DeepSpeed bf16 (fp32 master in the optimizer)
        self.describe = (f"dp={self.dp} tp={self.tp} pp={self.pp} zero_stage={self.zero} "
                         f"precision={lay.get('precision')}")

    def _need(self, name: str, what: str) -> str:
        path = os.path.join(self.ckpt, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{self.ckpt}: missing rank: {name} not found ({what}; layout {self.describe})")
        return path

    def model_file(self, m: int, d: int = 0) -> str:
        if self.zero == 3:
            return self._need(f"zero_pp_rank_{d}_mp_rank_{m:02d}_model_states.pt",
                              f"model states of data-parallel rank {d}, model-parallel rank {m}")
        return self._need(f"mp_rank_{m:02d}_model_states.pt", f"model states of model-parallel rank {m}")

    def optim_file(self, m: int, d: int) -> str:
        prefix = "bf16_" if self.bf16 else ""
        return self._need(f"{prefix}zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt",
                          f"optimizer partition of data-parallel rank {d}, model-parallel rank {m}")

    def layer_file(self, layer: int, tp: int) -> str:
        name = f"layer_{layer:02d}-model_{tp:02d}-model_states.pt"
        if os.path.isfile(os.path.join(self.ckpt, name)):
            return os.path.join(self.ckpt, name)
        plain = f"layer_{layer:02d}-model_states.pt"
        if self.tp == 1 and os.path.isfile(os.path.join(self.ckpt, plain)):
            return os.path.join(self.ckpt, plain)
        return self._need(name, f"pipeline layer {layer} of tensor rank {tp}")

    def all_files(self) -> List[str]:
        """Every file conversion reads, checked to exist before any is loaded."""
        files = []
        for r in self.record["mp_ranks"]:
            m = r["mp_rank"]
            files += [self.model_file(m, d) for d in range(self.dp if self.zero == 3 else 1)]
            if self.zero >= 1:
                files += [self.optim_file(m, d) for d in range(self.dp)]
            layers = sorted({tuple(p[4])[0] for p in r["params"] if p[4] is not None})
            files += [self.layer_file(layer, r["tp"]) for layer in layers]
        return files


# --- the whole model, tensor by tensor ---------------------------------------------------------------
def read_checkpoint(path: str, optimizer: bool = False, checksums: bool = True) -> TrainingState:
    """Every shard of a training checkpoint (any dp / tp / pp / ZeRO stage / precision) -> full fp32
    tensors under the plain model's names (+ AdamW moments with `optimizer=True`). Every file is first
    checked against the checkpoint's manifest (sizes, sha256 unless `checksums=False`), then opened
    memory-mapped (its pickle read and checked) before any tensor is copied; the tensors are then
    assembled one at a time (megams.checkpoint.sharded). For one rank's share, or to stream a
    conversion, use `sharded.open_checkpoint` and read per tensor instead."""
    from megams.checkpoint.sharded import open_checkpoint
    src = open_checkpoint(path, checksums=checksums)
    files = src.files
    paths = list(dict.fromkeys(files.all_files()))  # every file a layout needs is there ...
    for p in paths:
        src.load(p)                                  # ... and is a readable DeepSpeed file
    try:
        params = {n: src.read(n) for n in src.names()}
        opt = None
        if optimizer and src.optimizer:
            opt = {n: {k: src.read(n, k) for k in ("exp_avg", "exp_avg_sq")} for n in params}
        adam_step = src.adam_step() if optimizer else None
    except KeyError as e:
        raise CheckpointError(f"{src.path}: truncated or corrupted checkpoint shard (missing entry {e})") from None
    return TrainingState(src.path, src.meta, params, opt, adam_step, paths, describe(src, len(paths)))


def describe(src, n_files: int) -> List[str]:
    """What a conversion reports it read."""
    files = src.files
    source = ("module weights (fp32)" if files.zero == 0 else f"fp32 master weights from the ZeRO-{files.zero} "
              f"optimizer partitions of {files.dp} data-parallel rank(s)")
    return [f"read {src.path} (step {src.meta['step']}; layout {files.describe}): {n_files} files",
            f"weights: {source}" + (f"; {files.tp} tensor-parallel shards merged along their partition dims"
                                    if files.tp > 1 else "") + (f"; {files.pp} pipeline stages mapped to "
                                                                "plain-model names" if files.pp > 1 else "")]


__all__ = ["read_checkpoint", "resolve_checkpoint", "read_meta", "TrainingState", "DeepSpeedObject", "META_FILE"]

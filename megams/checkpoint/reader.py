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
from megams.checkpoint.serialization import DeepSpeedObject, load_shard
from megams.checkpoint.zero import merge_zero12, merge_zero3

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


# --- one model-parallel rank --------------------------------------------------------------------
def _zero_state(opt: dict, zero: int) -> tuple:
    """(fp32 flat groups, base optimizer state dict) of one ZeRO optimizer file."""
    osd = opt["optimizer_state_dict"]
    if zero == 3:
        return osd["fp32_flat_groups"], osd["optimizer_state_dict"]
    return osd["single_partition_of_fp32_groups"], osd["base_optimizer_state"]


def _as_int(step) -> int:
    return int(step.item()) if torch.is_tensor(step) else int(step)


def _read_mp_rank(files: _Files, rec: dict, loaded: Dict[str, object], optimizer: bool, where: str) -> tuple:
    """(params, moments or None, adam step) of one model-parallel rank, by engine name, local shapes."""
    m, zero = rec["mp_rank"], files.zero
    model_sd = loaded[files.model_file(m)]
    moments = None
    adam_step = None
    if zero == 0:
        module = model_sd.get("module")
        params = {}
        if module is not None:
            params = {n: t.float() for n, t in module.items()}
        if optimizer and model_sd.get("optimizer") is not None:
            osd = model_sd["optimizer"]
            moments = {"exp_avg": {}, "exp_avg_sq": {}}
            for names, group in zip(rec["groups"], osd["param_groups"]):
                if len(names) != len(group["params"]):
                    raise CheckpointError(f"{where}: optimizer group holds {len(group['params'])} parameters, the "
                                          f"layout record {len(names)}")
                for name, idx in zip(names, group["params"]):
                    st = osd["state"].get(idx)
                    if st:
                        moments["exp_avg"][name] = st["exp_avg"].float()
                        moments["exp_avg_sq"][name] = st["exp_avg_sq"].float()
                        adam_step = _as_int(st["step"])
    else:
        shapes = model_sd["param_shapes"]
        opts = [loaded[files.optim_file(m, d)] for d in range(files.dp)]
        states = [_zero_state(o, zero) for o in opts]
        kinds = {"fp32": [s[0] for s in states]}
        if optimizer:
            for key in ("exp_avg", "exp_avg_sq"):
                kinds[key] = [[s[1]["state"][g][key] for g in range(len(shapes))] for s in states]
            first = states[0][1]["state"].get(0, {})
            adam_step = _as_int(first["step"]) if "step" in first else None
        paddings = opts[0]["optimizer_state_dict"].get("param_alignment_paddings")
        merged = {}
        for key, parts in kinds.items():
            try:
                merged[key] = (merge_zero3(shapes, parts, where) if zero == 3
                               else merge_zero12(shapes, parts, paddings, where))
            except ValueError as e:
                raise CheckpointError(str(e)) from None
        params = merged.pop("fp32")
        moments = merged or None
    # pipeline stages keep their module in layer files: the fp32 master (ZeRO >= 1) wins where it exists
    for name, _, _, _, layer in rec["params"]:
        if layer is not None and name not in params:
            sd = loaded[files.layer_file(layer[0], rec["tp"])]
            if layer[1] not in sd:
                raise CheckpointError(f"{where}: layer file of layer {layer[0]} has no {layer[1]!r}")
            params[name] = sd[layer[1]].float()
    return params, moments, adam_step


# --- the whole model ----------------------------------------------------------------------------
def _assemble(record: dict, per_rank: Dict[int, dict], tp_size: int, where: str) -> Dict[str, torch.Tensor]:
    """Engine-named local shards of every mp rank -> full plain tensors."""
    pieces: Dict[str, Dict[int, tuple]] = {}
    for rec in record["mp_ranks"]:
        values = per_rank[rec["mp_rank"]]
        for name, plain, shape, dim, _ in rec["params"]:
            plain = record["tied"].get(plain, plain)  # a stage's copy of a tied weight is the same weight
            if name not in values:
                continue
            pieces.setdefault(plain, {}).setdefault(rec["tp"], (values[name], dim))  # first stage wins
    out = {}
    for plain, full in record["plain"].items():
        got = pieces.get(plain)
        if not got:
            raise CheckpointError(f"{where}: no shard holds parameter {plain}")
        dims = {dim for _, dim in got.values()}
        if dims == {None}:
            tensor = got[min(got)][0]
        else:
            if len(dims) != 1 or sorted(got) != list(range(tp_size)):
                raise CheckpointError(f"{where}: parameter {plain} has shards of tensor ranks {sorted(got)} "
                                      f"(partition dims {sorted(d for d in dims if d is not None)}), expected "
                                      f"ranks 0..{tp_size - 1} along one dim")
            dim = dims.pop()
            tensor = torch.cat([got[t][0] for t in range(tp_size)], dim).narrow(dim, 0, full[dim])
        if list(tensor.shape) != list(full):
            raise CheckpointError(f"{where}: parameter {plain} assembles to shape {list(tensor.shape)}, the model "
                                  f"has {list(full)}")
        out[plain] = tensor.contiguous()
    return out


def read_checkpoint(path: str, optimizer: bool = False, checksums: bool = True) -> TrainingState:
    """Every shard of a training checkpoint (any dp / tp / pp / ZeRO stage / precision) -> full fp32
    tensors under the plain model's names (+ AdamW moments with `optimizer=True`). Every file is first
    checked against the checkpoint's manifest (sizes, sha256 unless `checksums=False`)."""
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    from megams.checkpoint.manifest import verify
    verify(ckpt, meta, checksums=checksums)
    try:
        record = parameter_record(meta)
    except CheckpointError as e:
        raise CheckpointError(f"{os.path.join(ckpt, META_FILE)}: {e}") from None
    files = _Files(ckpt, meta, record)
    paths = files.all_files()
    loaded = {p: load_shard(p) for p in dict.fromkeys(paths)}
    for p, sd in loaded.items():
        if not isinstance(sd, dict) or not (("module" in sd) or ("optimizer_state_dict" in sd) or p.count("layer_")):
            raise CheckpointError(f"{p}: truncated or corrupted checkpoint shard (not a DeepSpeed state dict)")

    per_rank, moments, steps = {}, {}, set()
    for rec in record["mp_ranks"]:
        where = f"{ckpt} (model-parallel rank {rec['mp_rank']})"
        try:
            params, mom, adam_step = _read_mp_rank(files, rec, loaded, optimizer, where)
        except KeyError as e:
            raise CheckpointError(f"{where}: truncated or corrupted checkpoint shard (missing entry {e})") from None
        per_rank[rec["mp_rank"]] = params
        if mom is not None:
            moments[rec["mp_rank"]] = mom
        if adam_step is not None:
            steps.add(adam_step)
    params = _assemble(record, per_rank, files.tp, ckpt)
    opt = None
    if optimizer and len(moments) == len(per_rank):
        exp_avg = _assemble(record, {m: v["exp_avg"] for m, v in moments.items()}, files.tp, ckpt)
        exp_avg_sq = _assemble(record, {m: v["exp_avg_sq"] for m, v in moments.items()}, files.tp, ckpt)
        opt = {n: {"exp_avg": exp_avg[n], "exp_avg_sq": exp_avg_sq[n]} for n in params}

    source = ("module weights (fp32)" if files.zero == 0 else f"fp32 master weights from the ZeRO-{files.zero} "
              f"optimizer partitions of {files.dp} data-parallel rank(s)")
    report = [f"read {ckpt} (step {meta['step']}; layout {files.describe}): {len(loaded)} files",
              f"weights: {source}" + (f"; {files.tp} tensor-parallel shards merged along their partition dims"
                                      if files.tp > 1 else "") + (f"; {files.pp} pipeline stages mapped to "
                                                                  "plain-model names" if files.pp > 1 else "")]
    return TrainingState(ckpt, meta, params, opt, steps.pop() if len(steps) == 1 else None, list(loaded), report)


__all__ = ["read_checkpoint", "resolve_checkpoint", "read_meta", "TrainingState", "DeepSpeedObject", "META_FILE"]

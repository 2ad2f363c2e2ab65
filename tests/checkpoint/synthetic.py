"""Synthetic training checkpoints of any layout, written the way DeepSpeed writes them (file names,
entries, ZeRO-1 flat partitions, pipeline layer files, padded vocabulary), with the megams.json
"parameters" record of megams.checkpoint.layout, so the sharded reader can be tested at layouts
(tp8 x pp8 = 64 ranks) that cannot run here, without 64 processes or DeepSpeed.

A small transformer-like plain model: embed.weight [V, d] (split on dim 0, padded), per layer a
replicated norm [d], a column-parallel wq [h, d] (dim 0), its bias [h] (dim 0), a row-parallel wo
[d, h] (dim 1), then norm_f [d], a 0-d gate and the tied head (= embed.weight). Values are fixed functions of
the name, so any slice can be checked against `full_tensors`.
"""
from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from typing import Dict, List

import torch


def plain_model(layers: int, d: int, h: int, vocab: int) -> Dict[str, tuple]:
    """plain name -> (shape, partition dim, pipeline layer index)."""
    out = {"embed.weight": ((vocab, d), 0, 0)}
    for i in range(layers):
        out[f"blocks.{i}.norm.weight"] = ((d,), None, i + 1)
        out[f"blocks.{i}.wq.weight"] = ((h, d), 0, i + 1)
        out[f"blocks.{i}.wq.bias"] = ((h,), 0, i + 1)
        out[f"blocks.{i}.wo.weight"] = ((d, h), 1, i + 1)
    out["norm_f.weight"] = ((d,), None, layers + 1)
    out["norm_f.gate"] = ((), None, layers + 1)  # a 0-d parameter
    return out


def full_tensors(model: Dict[str, tuple], kind: str = "param") -> Dict[str, torch.Tensor]:
    out = {}
    for k, (name, (shape, _, _)) in enumerate(sorted(model.items())):
        g = torch.Generator().manual_seed(1000 * k + len(name))
        t = torch.randn(tuple(shape), generator=g)
        out[name] = {"param": t, "exp_avg": t * 0.1 + 1.0, "exp_avg_sq": t * t}[kind]
    return out


def _stage_layers(n_layers: int, pp: int) -> List[range]:
    per = math.ceil(n_layers / pp)
    return [range(s * per, min(n_layers, (s + 1) * per)) for s in range(pp)]


def _local(full: torch.Tensor, shape, dim, t: int, tp: int) -> torch.Tensor:
    if dim is None:
        return full.clone()
    local = math.ceil(shape[dim] / tp)
    pad = list(full.shape)
    pad[dim] = local * tp - shape[dim]
    padded = torch.cat([full, full.new_zeros(pad)], dim)
    return padded.narrow(dim, t * local, local).contiguous()


def layout_record(model: Dict[str, tuple], tp: int, pp: int) -> dict:
    """megams.json "parameters" for a tp x pp layout (mp_rank = pp_rank * tp + tp_rank)."""
    n_layers = max(layer for _, _, layer in model.values()) + 1
    stages = _stage_layers(n_layers, pp)
    ranks = []
    for s in range(pp):
        for t in range(tp):
            params = []
            for name, (shape, dim, layer) in model.items():
                if layer in stages[s]:
                    local = list(shape) if dim is None else [math.ceil(n / tp) if i == dim else n
                                                           for i, n in enumerate(shape)]
                    engine = f"{layer}.{name}" if pp > 1 else name
                    params.append([engine, name, local, dim, [layer, name] if pp > 1 else None])
            if s == pp - 1:  # the tied head: a copy of embed.weight on the last stage
                shape, dim, _ = model["embed.weight"]
                local = [math.ceil(shape[0] / tp), shape[1]]
                engine = "tied.head.weight" if pp > 1 else "head.weight"
                params.append([engine, "head.weight", local, 0, [n_layers - 1, "head.weight"] if pp > 1 else None])
            groups = [[p[0] for p in params if len(p[2]) >= 2], [p[0] for p in params if len(p[2]) < 2]]
            ranks.append({"mp_rank": s * tp + t, "pp": s, "tp": t, "params": params,
                          "groups": [g for g in groups if g]})
    return {"version": 1, "plain": {n: list(s) for n, (s, _, _) in model.items()},
            "tied": {"head.weight": "embed.weight"}, "mp_ranks": ranks}


def write_checkpoint(path: str, model: Dict[str, tuple], tp: int, pp: int, dp: int = 1, zero: int = 1,
                     step: int = 7) -> dict:
    """Write a checkpoint directory; returns its "parameters" record."""
    os.makedirs(path, exist_ok=True)
    record = layout_record(model, tp, pp)
    values = {k: full_tensors(model, k) for k in ("param", "exp_avg", "exp_avg_sq")}
    values = {k: {**v, "head.weight": v["embed.weight"]} for k, v in values.items()}
    shapes = {**{n: s for n, (s, _, _) in model.items()}, "head.weight": model["embed.weight"][0]}
    for rec in record["mp_ranks"]:
        m, t = rec["mp_rank"], rec["tp"]
        local = {k: {p[0]: _local(values[k][p[1]], shapes[p[1]], p[3], t, tp) for p in rec["params"]}
                 for k in values}
        by_name = {p[0]: p for p in rec["params"]}
        if pp > 1:  # module weights in the layer files
            layers: Dict[int, dict] = {}
            for name, p in by_name.items():
                layers.setdefault(p[4][0], {})[p[4][1]] = local["param"][name]
            for layer, sd in layers.items():
                torch.save(sd, os.path.join(path, f"layer_{layer:02d}-model_{t:02d}-model_states.pt"))
        model_sd = {"module": None if pp > 1 else dict(local["param"]), "buffer_names": [], "optimizer": None,
                    "param_shapes": None, "global_steps": step}
        if zero == 0:
            state, groups, idx = {}, [], 0
            for names in rec["groups"]:
                ids = []
                for name in names:
                    state[idx] = {"step": torch.tensor(float(step)), "exp_avg": local["exp_avg"][name],
                                  "exp_avg_sq": local["exp_avg_sq"][name]}
                    ids.append(idx)
                    idx += 1
                groups.append({"params": ids, "lr": 1e-3})
            model_sd["optimizer"] = {"state": state, "param_groups": groups}
        else:
            model_sd["param_shapes"] = [OrderedDict((n, torch.Size(by_name[n][2])) for n in names)
                                        for names in rec["groups"]]
            parts = {k: [] for k in values}  # [kind][group] -> dp partitions
            for names in rec["groups"]:
                for k in values:
                    flat = torch.cat([local[k][n].reshape(-1) for n in names])
                    total = 2 * dp * math.ceil(flat.numel() / (2 * dp))
                    flat = torch.cat([flat, flat.new_zeros(total - flat.numel())])
                    parts[k].append([c.clone() for c in flat.chunk(dp)])
            for d in range(dp):
                osd = {"single_partition_of_fp32_groups": [g[d] for g in parts["param"]],
                       "base_optimizer_state": {
                           "state": {g: {"step": torch.tensor(float(step)), "exp_avg": parts["exp_avg"][g][d],
                                         "exp_avg_sq": parts["exp_avg_sq"][g][d]} for g in range(len(rec["groups"]))},
                           "param_groups": [{"lr": 1e-3, "params": [g]} for g in range(len(rec["groups"]))]},
                       "param_alignment_paddings": [[0] * len(names) for names in rec["groups"]],
                       "partition_count": [dp] * len(rec["groups"])}
                torch.save({"optimizer_state_dict": osd},
                           os.path.join(path, f"zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt"))
        torch.save(model_sd, os.path.join(path, f"mp_rank_{m:02d}_model_states.pt"))
    meta = {"format": "megams-checkpoint/1", "step": step,
            "config": {"model": {"type": "synthetic"}, "data": {"tokenizer": "byte"},
                       "training": {"seed": 0, "precision": "fp32"}},
            "layout": {"world": tp * pp * dp, "dp": dp, "tp": tp, "pp": pp, "zero_stage": zero, "precision": "fp32"},
            "parameters": record}
    with open(os.path.join(path, "megams.json"), "w") as f:
        json.dump(meta, f)
    return record

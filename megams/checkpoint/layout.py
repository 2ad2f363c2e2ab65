"""What a training checkpoint records about how the model is split, so any layout can be put back
together (`megams.checkpoint.reader`) and DeepSpeed's universal-checkpoint tools can read it too.

Written by the trainer into `megams.json` under "parameters" (collective: every rank contributes):

    "parameters": {
      "version": 1,
      "plain": {name: shape},                 the plain model's parameters (tied ones once)
      "tied": {alias: name},                  e.g. {"head.weight": "embed.weight"}
      "mp_ranks": [                           one per model-parallel rank, in DeepSpeed's mp_rank order
        {"mp_rank": 0, "pp": 0, "tp": 0,
         "params": [[engine_name, plain_name, local_shape, partition_dim, layer], ...],
         "groups": [[engine_name, ...], ...]}  optimizer param groups (ZeRO-0 state is indexed by them)
      ]}

`engine_name` is the name in the module DeepSpeed wraps (what its files use); `plain_name` the name in
`build_model(cfg.model)` (a parameter may carry `megams_name` to say it, e.g. inside a pipeline stage);
`partition_dim` is set for tensor-parallel shards (`tensor_model_parallel` + `partition_dim` attributes,
see megams.parallel.layers) and the plain shape says where padding (a padded vocabulary) is cropped;
`layer` is (layer index, key) of a pipeline layer file, or null.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional

from torch import nn

LAYOUT_VERSION = 1
VOCAB_PARAMETERS = ("embed.weight", "head.weight")  # [vocab, d]: padded for tensor parallelism


def tied_parameters(model: nn.Module) -> Dict[str, str]:
    """{alias: first name} for parameters shared under several names (the tied LM head)."""
    first: Dict[int, str] = {}
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
    return tied


def plain_parameters(model: nn.Module) -> dict:
    """The part of the record that describes the plain model (call before parallelism is applied)."""
    return {"plain": {n: list(p.shape) for n, p in model.named_parameters()}, "tied": tied_parameters(model)}


def _layer_keys(module: nn.Module) -> Dict[int, list]:
    """DeepSpeed PipelineModule: id(param) -> [layer index, key in that layer's file]."""
    funcs = getattr(module, "forward_funcs", None)
    start = getattr(module, "_local_start", None)
    if funcs is None or start is None:
        return {}
    out = {}
    for i, layer in enumerate(funcs):
        if isinstance(layer, nn.Module):
            for key, p in layer.named_parameters():
                out.setdefault(id(p), [start + i, key])
    return out


def optimizer_groups(module: nn.Module) -> List[List[str]]:
    """The names in each param group of `megams.training.engine.param_groups` (decay: ndim >= 2),
    empty groups dropped as DeepSpeed drops them."""
    from megams.parallel.layers import param_shape  # trainer side: the torch-only loader never imports parallel
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (decay if len(param_shape(p)) >= 2 else no_decay).append(name)
    return [g for g in (decay, no_decay) if g]


def rank_record(module: nn.Module, plain: dict, mp_rank: int, pp: int, tp: int) -> dict:
    from megams.parallel.layers import param_shape
    layers = _layer_keys(module)
    params = []
    for name, p in module.named_parameters():
        shape = list(param_shape(p))
        dim = int(p.partition_dim) if getattr(p, "tensor_model_parallel", False) else None
        params.append([name, getattr(p, "megams_name", name), shape, dim, layers.get(id(p))])
    return {"mp_rank": mp_rank, "pp": pp, "tp": tp, "params": params, "groups": optimizer_groups(module)}


def gather_layout(engine, plain: dict, pp_rank: int, tp_rank: int, dp_rank: int) -> dict:
    """Collective: every rank describes its shard; every rank gets the whole record."""
    import torch.distributed as dist
    mine = rank_record(engine.module, plain, int(getattr(engine, "checkpoint_mp_rank", 0)), pp_rank, tp_rank)
    mine["dp"] = dp_rank
    everyone: List[Optional[dict]] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    by_mp = {}
    for rec in everyone:
        if rec["dp"] == 0:
            rec = dict(rec)
            rec.pop("dp")
            by_mp[rec["mp_rank"]] = rec
    return {"version": LAYOUT_VERSION, **plain, "mp_ranks": [by_mp[m] for m in sorted(by_mp)]}


def universal_checkpoint_info(record: dict, vocab_size: int, version: float) -> dict:
    """What DeepSpeed's `ds_to_universal` reads from the model-states files (attached to the module
    as `universal_checkpoint_info`, which DeepSpeed saves): which parameters are replicated over the
    tensor ranks, which are split along dim 1 (row parallel; dim 0 is its default), which hold the
    (padded) vocabulary, and which pipeline-replicated (tied) ones to take once."""
    replicated, row, vocab, tied_pp = set(), set(), set(), set()
    padded = vocab_size
    plain_vocab = set(VOCAB_PARAMETERS)
    for r in record["mp_ranks"]:
        for name, plain_name, shape, dim, _ in r["params"]:
            pattern = "^" + re.escape(name) + "$"
            if dim is None:
                replicated.add(pattern)
            elif dim == 1:
                row.add(pattern)
            if plain_name in plain_vocab:
                vocab.add(pattern)
                if dim == 0:
                    tp = max(x["tp"] for x in record["mp_ranks"]) + 1
                    padded = max(padded, shape[0] * tp)
            if r["pp"] > 0 and (plain_name in record["tied"] or plain_name in record["tied"].values()):
                tied_pp.add(pattern)
    return {"universal_checkpoint_version": version,
            "tp_replicated_parameter_patterns": sorted(replicated),
            "parameter_with_row_parallelism_patterns": sorted(row),
            "vocabulary_parameter_patterns": sorted(vocab),
            "pipeline_replicated_parameter_patterns": sorted(tied_pp),
            "original_vocab_size": vocab_size,
            "padded_vocab_size": padded}

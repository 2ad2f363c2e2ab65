"""Tiny model configs and the option matrix every model test iterates over.

`cases(model_type)` gives pairwise coverage of that model's options (every pair of option values
appears in some case); `cases(model_type, full=True)` the full cross product (tests marked `full`).
"""
from __future__ import annotations

import itertools
from typing import Dict, List

from megams.config.schema import ModelConfig

COMMON = {"norm": ["layernorm", "rmsnorm"], "mlp": ["gelu", "swiglu"], "positions": ["rotary", "learned"]}
OPTIONS: Dict[str, Dict[str, list]] = {
    "vanilla": {**COMMON, "tie_embeddings": [True, False]},
    "bottom_up": {"pooling": ["avg", "linear", "attention"], "upsampling": ["repeat", "linear", "attention"],
                  "aggregation": ["sum", "attention"], "shift_pad": ["zeros", "learned"], "scales": [2, 3],
                  "scale_merge": ["norm", "gate", "none"], **COMMON},
    "top_down": {"pooling": ["avg", "linear", "attention"], "upsampling": ["repeat", "linear", "attention"],
                 "shift_pad": ["zeros", "learned"], "n_pre": [0, 1], "scales": [2, 3],
                 "scale_merge": ["norm", "gate", "none"], **COMMON},
    "retina": {"retina_last_window": ["finite", "all"], "levels": [2, 3], "retina_chunk_size": [None, 5], **COMMON},
}


def tiny(model_type: str, **over) -> ModelConfig:
    """A model small enough for many CPU forwards; K_S = 8 (bottom-up/top-down), retina reach ~24."""
    scales = over.pop("scales", 3)
    levels = over.pop("levels", 3)
    kw = dict(type=model_type, vocab_size=64, d_model=32, n_heads=2, n_layers=2, max_seq_len=64, dropout=0.0)
    if model_type in ("bottom_up", "top_down"):
        kw.update(shorten_factors=[2, 4][:scales - 1], layers_per_scale=[1, 1, 1][:scales], n_post=1)
    if model_type == "retina":
        kw.update(retina_factors=[2, 8][:levels - 1], retina_windows=[4, 2, 2][:levels])
    kw.update(over)
    return ModelConfig(**kw)


def pairwise(options: Dict[str, list]) -> List[dict]:
    """A small set of combinations covering every pair of values of every two options (greedy)."""
    keys = list(options)
    todo = {(a, va, b, vb) for i, a in enumerate(keys) for b in keys[i + 1:]
            for va in options[a] for vb in options[b]}
    product = [dict(zip(keys, vals)) for vals in itertools.product(*options.values())]

    def pairs(c):
        return {(a, c[a], b, c[b]) for i, a in enumerate(keys) for b in keys[i + 1:]}

    chosen = []
    while todo:
        best = max(product, key=lambda c: len(pairs(c) & todo))
        chosen.append(best)
        todo -= pairs(best)
    return chosen


def cases(model_type: str, full: bool = False) -> List[dict]:
    opts = OPTIONS[model_type]
    combos = [dict(zip(opts, v)) for v in itertools.product(*opts.values())] if full else pairwise(opts)
    return combos


def case_id(combo: dict) -> str:
    return "-".join(f"{v}" for v in combo.values())


def all_cases():
    """Pairwise (model_type, combo) pairs for pytest.mark.parametrize, with readable ids."""
    import pytest
    return [pytest.param(t, c, id=f"{t}-{case_id(c)}") for t in OPTIONS for c in cases(t)]

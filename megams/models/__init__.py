"""The four multi-scale LMs as plain torch modules (no torch.distributed / deepspeed imports).

    model = build_model(cfg.model, seed=0)       # logits = model(tokens); h = model.forward_hidden(tokens)

Parallelism is applied from outside (megams.parallel); costs for MFU and partitioning are in
`megams.models.cost`.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from megams.config.schema import ModelConfig
from megams.models.base import LanguageModel
from megams.models.bottom_up import BottomUpLM
from megams.models.init import init_parameters
from megams.models.retina import RetinaLM
from megams.models.top_down import TopDownLM
from megams.models.vanilla import VanillaLM

MODELS = {"vanilla": VanillaLM, "bottom_up": BottomUpLM, "top_down": TopDownLM, "retina": RetinaLM}


def build_model(model_cfg: ModelConfig, seed: int = 0,
                device: Optional[Union[str, torch.device]] = None) -> LanguageModel:
    """Build the model of `model_cfg.type`, initialised by `init_parameters(model, seed, init_std)`.
    Parameters are created on the meta device first (no wasted default init), then materialised on
    `device` (default cpu); `device="meta"` returns the uninitialised skeleton (shapes only)."""
    with torch.device("meta"):
        model = MODELS[model_cfg.type](model_cfg)
    if str(device) == "meta":
        return model
    model = model.to_empty(device=device or "cpu")
    model.tie_weights()  # to_empty re-creates parameters: share embed/head again
    init_parameters(model, seed, model_cfg.init_std)
    return model


__all__ = ["build_model", "init_parameters", "MODELS", "LanguageModel", "VanillaLM", "BottomUpLM", "TopDownLM",
           "RetinaLM"]

"""Retina LM: every layer keeps full-resolution queries; each looks at the recent past sharply and
the far past through pooled keys/values (see `retina_attention.py` for the exact windows).

Embedding -> `blocks` (pre-norm Blocks whose attention is `RetinaAttention`) -> norm -> head.
Any length T works directly (no padding: nothing is shortened).
"""
from __future__ import annotations

import torch
from torch import nn

from megams.config.schema import ModelConfig
from megams.models.base import LanguageModel
from megams.models.layers import Block
from megams.models.retina_attention import RetinaAttention


class RetinaLM(LanguageModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.blocks = nn.ModuleList(Block(cfg, attention=RetinaAttention.from_config(cfg))
                                    for _ in range(cfg.n_layers))

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x

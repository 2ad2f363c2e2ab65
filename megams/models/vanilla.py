"""Vanilla transformer LM: embedding -> L blocks at full resolution -> norm -> head (the baseline)."""
from __future__ import annotations

import torch

from megams.config.schema import ModelConfig
from megams.models.base import LanguageModel
from megams.models.layers import make_blocks


class VanillaLM(LanguageModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.blocks = make_blocks(cfg, cfg.n_layers)

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x

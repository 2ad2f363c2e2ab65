"""Bottom-up multi-scale LM (the paper's headline model): fine-to-coarse, then aggregate.

    h_0 = scale_blocks[0](embed(tokens))
    h_s = scale_blocks[s](shorten[s-1](h_{s-1}))             s = 1..S
    x   = aggregate(h_0, [upsample[s-1](h_s, h_0) for s = 1..S])
    out = head(norm_f(post_blocks(x)))

`shorten[i]` takes scale i to scale i+1 (factor k_{i+1}); `upsample[i]` brings scale i+1 straight
back to scale 0 (factor K_{i+1} = k_1*...*k_{i+1}); with `sum` aggregation it first merges h_s
to h_0's scale (`upsample[i].merge`, `model.scale_merge`; issue 14). Coarse blocks use rotary positions 0..n/K_s-1.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from megams.config.schema import ModelConfig
from megams.models.base import LanguageModel
from megams.models.layers import make_blocks
from megams.models.scales import Aggregation, Shorten, Upsample


class BottomUpLM(LanguageModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        ks = cfg.shorten_factors
        self.scale_blocks = nn.ModuleList(make_blocks(cfg, n) for n in cfg.layers_per_scale)
        self.shorten = nn.ModuleList(Shorten(cfg, k) for k in ks)
        merge = cfg.aggregation == "sum"  # attention aggregation normalises every scale itself
        self.upsample = nn.ModuleList(Upsample(cfg, math.prod(ks[:s + 1]), merge=merge) for s in range(len(ks)))
        self.aggregate = Aggregation(cfg, len(ks) + 1)
        self.post_blocks = make_blocks(cfg, cfg.n_post)

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.scale_blocks[0]:
            x = blk(x)
        h0, scales = x, []
        for shorten, blocks in zip(self.shorten, self.scale_blocks[1:]):
            x = shorten(x)
            for blk in blocks:
                x = blk(x)
            scales.append(x)
        x = self.aggregate(h0, [up(h, h0) for up, h in zip(self.upsample, scales)])
        for blk in self.post_blocks:
            x = blk(x)
        return x

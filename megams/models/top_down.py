"""Top-down multi-scale LM: the coarsest view of the past is computed first and conditions each
finer scale.

    e_0 = pre_blocks(embed(tokens));  e_s = shorten[s-1](e_{s-1})       s = 1..S
    g_S = scale_blocks[S](e_S)
    g_s = scale_blocks[s](e_s + upsample[s](merge(g_{s+1}), e_s))       s = S-1..0
    out = head(norm_f(g_0))

`merge` (`upsample[s].merge`, `model.scale_merge`) brings the coarse residual stream, which grows
with depth, to the scale of e_s: without it the fine blocks barely see the current token (issue 14).
`shorten[i]` takes scale i to i+1 and `upsample[i]` brings scale i+1 back to scale i (factor
k_{i+1}); `scale_blocks[s]` holds n_s = layers_per_scale[s] blocks. Pooling defaults to `linear`:
with rotary positions the raw embeddings carry no order that an average could keep.
"""
from __future__ import annotations

import torch
from torch import nn

from megams.config.schema import ModelConfig
from megams.models.base import LanguageModel
from megams.models.layers import make_blocks
from megams.models.scales import Shorten, Upsample


class TopDownLM(LanguageModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        ks = cfg.shorten_factors
        self.pre_blocks = make_blocks(cfg, cfg.n_pre)
        self.shorten = nn.ModuleList(Shorten(cfg, k) for k in ks)
        self.scale_blocks = nn.ModuleList(make_blocks(cfg, n) for n in cfg.layers_per_scale)
        self.upsample = nn.ModuleList(Upsample(cfg, k, merge=True) for k in ks)

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.pre_blocks:
            x = blk(x)
        e = [x]
        for shorten in self.shorten:
            e.append(shorten(e[-1]))
        g = e[-1]
        for s in reversed(range(len(e))):
            if s < len(e) - 1:
                g = e[s] + self.upsample[s](g, e[s])
            for blk in self.scale_blocks[s]:
                g = blk(g)
        return g

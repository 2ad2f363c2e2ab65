"""Incremental decoders: feed one token per step, get that position's next-token logits.

    dec = make_decoder(model)                   # cached, for every megams model type
    logits = dec.step(tokens)                   # tokens [B] at position dec.pos -> [B, V]

All four models are causal at every scale, so each position is computed once and what later
positions need is cached:
- vanilla / retina: per-layer key/value caches (retina: full-resolution window + pooled blocks,
  older entries dropped as the windows move on: constant cost per token);
- bottom-up: scale 0 blocks cached; coarse position j of scale s is computed (its blocks run once,
  with their own cache) when fine position j*K_s arrives; the aggregation is per position; the
  post blocks are cached;
- top-down: the embedding stream is shortened the same way; per fine step, new positions are
  computed coarsest first, each scale's blocks with their own cache, each reading the complete
  coarser position through the upsampling.
`RecomputeDecoder` is the honest baseline: the full forward over the whole prefix every step.
"""
from __future__ import annotations

import math
from typing import List

import torch

from megams.inference.streams import BlockStream, ShortenStream, UpsampleStream
from megams.models.embedding import check_length


class _Decoder:
    def __init__(self, model):
        if model.training:
            raise ValueError("incremental decoding needs the model in eval mode (model.eval())")
        self.model, self.cfg, self.pos = model, model.cfg, 0

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        check_length(self.cfg, self.pos + 1)
        x = self.model.embed(tokens[:, None])
        if self.model.pos_embed is not None:
            x = x + self.model.pos_embed(torch.tensor([self.pos], device=tokens.device))
        return x

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        self.pos += 1
        return self.model.head(self.model.norm_f(x))[:, 0]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._out(self._hidden(self._embed(tokens), self.pos))

    def _hidden(self, x, i):
        raise NotImplementedError


class FlatDecoder(_Decoder):
    """vanilla and retina: one stack of full-resolution blocks."""

    def __init__(self, model):
        super().__init__(model)
        self.blocks = BlockStream(model.blocks)

    def _hidden(self, x, i):
        return self.blocks.step(x, i)


class BottomUpDecoder(_Decoder):
    def __init__(self, model):
        super().__init__(model)
        self.scales = [BlockStream(b) for b in model.scale_blocks]
        self.shorten = [ShortenStream(s) for s in model.shorten]
        self.upsample = [UpsampleStream(u) for u in model.upsample]
        self.coarse_pos = [0] * len(self.shorten)   # next position of scale s+1
        self.post = BlockStream(model.post_blocks)

    def _hidden(self, x, i):
        h0 = self.scales[0].step(x, i)
        h, p = h0, i
        for s, (sh, up) in enumerate(zip(self.shorten, self.upsample)):
            c = sh.push(h, p)
            if c is None:
                break  # no new position at this scale, hence none coarser
            h, p = self.scales[s + 1].step(c, self.coarse_pos[s]), self.coarse_pos[s]
            self.coarse_pos[s] += 1
            up.add(h)
        x = self.model.aggregate(h0, [up.fine(i, h0) for up in self.upsample])
        return self.post.step(x, i)


class TopDownDecoder(_Decoder):
    def __init__(self, model):
        super().__init__(model)
        self.pre = BlockStream(model.pre_blocks)
        self.shorten = [ShortenStream(s) for s in model.shorten]
        self.scales = [BlockStream(b) for b in model.scale_blocks]
        self.upsample = [UpsampleStream(u) for u in model.upsample]
        self.K = [math.prod(model.cfg.shorten_factors[:s]) for s in range(len(model.scale_blocks))]

    def _hidden(self, x, i):
        e = [self.pre.step(x, i)]                       # e_s at its new position (if any), s = 0..S
        for s, sh in enumerate(self.shorten):
            c = sh.push(e[-1], i // self.K[s])
            if c is None:
                break
            e.append(c)
        g = None
        for s in reversed(range(len(e))):             # scales with a new position, coarsest first
            p = i // self.K[s]
            inp = e[s] if s == len(self.scales) - 1 else e[s] + self.upsample[s].fine(p, e[s])
            g = self.scales[s].step(inp, p)
            if s > 0:
                self.upsample[s - 1].add(g)
        return g


class RecomputeDecoder:
    """The full forward over the whole prefix at every step (no cache): the reference and baseline."""

    def __init__(self, model):
        self.model, self.pos, self.tokens = model, 0, None

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens[:, None]
        self.tokens = t if self.tokens is None else torch.cat([self.tokens, t], dim=1)
        self.pos += 1
        return self.model(self.tokens)[:, -1]


DECODERS = {"vanilla": FlatDecoder, "retina": FlatDecoder, "bottom_up": BottomUpDecoder,
            "top_down": TopDownDecoder}


def make_decoder(model, cache: bool = True):
    """An incremental decoder for `model` (any megams model type); `cache=False`: full recompute."""
    if not cache:
        return RecomputeDecoder(model)
    return DECODERS[model.cfg.type](model)

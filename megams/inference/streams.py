"""The pieces of a model run one position at a time, each holding what later positions need.

    BlockStream(blocks)      a stack of Blocks (causal or retina attention) with their caches
    ShortenStream(shorten)   scale s -> s+1: emits coarse position j once fine position j*k arrives
    UpsampleStream(up)       coarse -> fine: fine position i reads coarse i // k (only complete ones)

They reuse the modules' weights and mirror their forward (megams.models.layers / scales) in eval mode;
`tests/inference` checks every option against the full forward.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from megams.inference.kv import KVBuffer, RetinaState, _heads, _rot, attention_step
from megams.models.retina_attention import RetinaAttention


class BlockStream:
    def __init__(self, blocks):
        self.blocks = list(blocks)
        self.caches = [RetinaState(b.attn) if isinstance(b.attn, RetinaAttention) else KVBuffer()
                       for b in self.blocks]

    def step(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        for blk, cache in zip(self.blocks, self.caches):
            h = blk.norm1(x)
            a = cache.step(h, pos) if isinstance(cache, RetinaState) else attention_step(blk.attn, h, pos, cache)
            x = x + a
            x = x + blk.mlp(blk.norm2(x))
        return x


class ShortenStream:
    """Coarse j pools fine positions j*k-k+1 .. j*k (the shift right by k-1, padded in front)."""

    def __init__(self, shorten):
        self.sh, self.k = shorten, shorten.k
        self.recent: List[torch.Tensor] = []

    def push(self, x: torch.Tensor, pos: int) -> Optional[torch.Tensor]:
        """x [B, 1, d] at fine position `pos`; the new coarse position's vector [B, 1, d], or None."""
        self.recent = (self.recent + [x[:, 0]])[-self.k:]
        if pos % self.k:
            return None
        group = self.recent
        missing = self.k - len(group)
        if missing:  # positions before 0: zeros or the learned pad vector
            B, d = x.shape[0], x.shape[-1]
            pad = x.new_zeros(d) if self.sh.pad is None else self.sh.pad.to(x.dtype)
            group = [pad.expand(B, d)] * missing + group
        return self.sh.pool(torch.stack(group, dim=1)[:, None])


class UpsampleStream:
    """Upsample(k): fine position i gets coarse m = i // k (`repeat`), row i % k of proj(coarse m)
    (`linear`), or repeat + attention from the fine stream over coarse 0..m (`attention`)."""

    def __init__(self, up):
        self.up, self.k = up, up.k
        self.coarse: List[torch.Tensor] = []     # [B, 1, d] per coarse position, merged (repeat / attention)
        self.rows: List[torch.Tensor] = []       # linear: proj output [B, k, d] per coarse position
        self.cache = KVBuffer()                  # attention: keys / values of the coarse positions

    def add(self, c: torch.Tensor) -> None:
        """The next coarse position's vector [B, 1, d]."""
        up, j = self.up, len(self.coarse)
        merged = up.merged(c)                    # through Upsample.merge when it has one
        self.coarse.append(merged)
        if up.kind == "linear":
            self.rows.append(up.proj(merged).view(c.shape[0], self.k, -1))
        elif up.kind == "attention":
            a = up.attn
            kv = up.norm_kv(c)
            k = _rot(_heads(a.wk, kv, a.head_dim), torch.tensor([j * self.k], device=c.device), a.rotary_base)
            self.cache.append(k.transpose(1, 2), _heads(a.wv, kv, a.head_dim).transpose(1, 2))

    def fine(self, i: int, fine: torch.Tensor) -> torch.Tensor:
        m = i // self.k
        if self.up.kind == "linear":
            return self.rows[m][:, i % self.k][:, None]
        out = self.coarse[m]
        if self.up.kind == "attention":
            a = self.up.attn
            q = _rot(_heads(a.wq, self.up.norm_q(fine), a.head_dim), torch.tensor([i], device=fine.device),
                     a.rotary_base)
            keys, values = self.cache.get(0, m + 1)
            y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values)
            out = out + a.wo(y.transpose(1, 2).reshape(fine.shape[0], 1, -1))
        return out

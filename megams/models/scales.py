"""Moving between scales causally: `Shorten` (fine -> coarse), `Upsample` (coarse -> fine),
`Aggregation` (combine every scale at full resolution; the bottom-up model's aggregation layer),
`Merge` (scale a coarse stream to the fine one it joins).

The causal contract (docs/MODELS.md): after `Shorten(k)`, coarse position j summarises fine
positions <= j*k only; `Upsample(k)` hands coarse j to fine positions j*k .. j*k+k-1 (and, with
`attention`, lets fine position i look at coarse positions j with j*k <= i). Composing them keeps
every output position free of later tokens.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megams.config.schema import ModelConfig
from megams.models.layers import MLP, Attention, make_attention, make_norm


class Shorten(nn.Module):
    """[B, n, d] -> [B, n/k, d]: shift right by k-1 (pad zeros or a learned vector), then pool
    each group of k: `avg`, `linear` (k*d -> d), or `attention` (the group's mean attends to its
    members, + residual + MLP)."""

    def __init__(self, cfg: ModelConfig, k: int):
        super().__init__()
        self.k = k
        self.kind = cfg.pooling_kind
        d = cfg.d_model
        self.pad = nn.Parameter(torch.empty(d)) if cfg.shift_pad == "learned" else None
        if self.kind == "linear":
            self.proj = nn.Linear(k * d, d, bias=False)
        elif self.kind == "attention":
            self.norm1 = make_norm(cfg)
            self.attn = make_attention(cfg)
            self.norm2 = make_norm(cfg)
            self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, n, d = x.shape
        k, m = self.k, n // self.k
        # shifted right by k-1: group j holds fine j*k-k+1 .. j*k (one copy, no zeros tensor + cat)
        if self.pad is None:
            x = F.pad(x[:, :n - k + 1], (0, 0, k - 1, 0))
        else:
            x = torch.cat([self.pad.to(x.dtype).expand(B, k - 1, d), x[:, :n - k + 1]], dim=1)
        return self.pool(x.view(B, m, k, d))

    def pool(self, groups: torch.Tensor) -> torch.Tensor:
        """[B, m, k, d] groups of k (already shifted) -> [B, m, d]; also used by cached decoding."""
        B, m, k, d = groups.shape
        if self.kind == "avg":
            return groups.mean(dim=2)
        if self.kind == "linear":
            return self.proj(groups.reshape(B, m, k * d))
        g = groups.reshape(B * m, k, d)
        q = g.mean(dim=1, keepdim=True)
        pos = torch.arange(k, device=groups.device)  # members at 0..k-1, the query at the group's end
        out = q + self.attn(self.norm1(q), self.norm1(g), causal=False, q_pos=pos[-1:], k_pos=pos)
        out = out + self.mlp(self.norm2(out))
        return out.view(B, m, d)


class Merge(nn.Module):
    """Brings a coarse residual stream to the scale of the finer stream it is added to (issue 14):
    `norm`: a norm whose gain starts at init_std (the embedding's scale); `gate`: a per-channel gate
    that starts at 0 (the coarse scale enters as training opens it). Per position: it commutes with
    repeat upsampling and runs at the coarse resolution (1/K of the memory of a full-resolution one)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.scale_merge
        if self.kind == "norm":
            self.norm = make_norm(cfg)
            self.norm.init_rules = {"weight": "std"}  # megams.models.init: gain = init_std, not 1
        else:
            self.gate = nn.Parameter(torch.empty(cfg.d_model))
            self.init_rules = {"gate": "zeros"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) if self.kind == "norm" else x * self.gate.to(x.dtype)


def make_merge(cfg: ModelConfig) -> Optional[Merge]:
    return None if cfg.scale_merge == "none" else Merge(cfg)


class Upsample(nn.Module):
    """coarse [B, m, d] -> [B, m*k, d]: `repeat`, `linear` (d -> k*d, reshaped), or `attention`
    (repeat + each fine position, queried from the fine stream `fine`, attends over the coarse
    positions j with j*k <= i; rotary puts coarse j at fine position j*k, its last summarised one).

    `merge=True` (top-down's merges, bottom-up's `sum` aggregation): the coarse stream first goes
    through `self.merge` (`Merge`, per `cfg.scale_merge`; None when `none`), then is upsampled;
    with `attention`, the merged stream is repeated and the attention reads its own `norm_kv`."""

    def __init__(self, cfg: ModelConfig, k: int, merge: bool = False):
        super().__init__()
        self.k = k
        self.kind = cfg.upsampling
        d = cfg.d_model
        self.merge = make_merge(cfg) if merge else None
        if self.kind == "linear":
            self.proj = nn.Linear(d, k * d, bias=False)
        elif self.kind == "attention":
            self.norm_q = make_norm(cfg)
            self.norm_kv = make_norm(cfg)
            self.attn = make_attention(cfg)

    def merged(self, coarse: torch.Tensor) -> torch.Tensor:
        """The coarse stream as it is upsampled (through `merge` if there is one)."""
        return coarse if self.merge is None else self.merge(coarse)

    def forward(self, coarse: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
        B, m, d = coarse.shape
        k = self.k
        c = self.merged(coarse)
        if self.kind == "linear":
            return self.proj(c).view(B, m, k, d).reshape(B, m * k, d)
        up = c.repeat_interleave(k, dim=1)
        if self.kind == "attention":
            i = torch.arange(m * k, device=coarse.device)
            j = torch.arange(m, device=coarse.device)
            mask = j[None, :] * k <= i[:, None]
            up = up + self.attn(self.norm_q(fine), self.norm_kv(coarse), causal=False, mask=mask,
                                q_pos=i, k_pos=j * k)
        return up


class Aggregation(nn.Module):
    """Combine h_0 and the upsampled coarse scales position by position: `sum` (the bottom-up model
    builds its upsamplings with `merge=True` then, so each coarse scale arrives at h_0's scale), or `attention`
    (h_0's vector queries its n_scales vectors, each tagged with a learned scale embedding;
    the result is added to h_0)."""

    def __init__(self, cfg: ModelConfig, n_scales: int):
        super().__init__()
        self.kind = cfg.aggregation
        if self.kind == "attention":
            self.scale_embed = nn.Parameter(torch.empty(n_scales, cfg.d_model))
            self.norm = make_norm(cfg)
            self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout, rotary_base=None, fused_qkv=cfg.fused_qkv)

    def forward(self, h0: torch.Tensor, upsampled: List[torch.Tensor]) -> torch.Tensor:
        if self.kind == "sum":
            return h0 + sum(upsampled)
        B, T, d = h0.shape
        stack = torch.stack([h0, *upsampled], dim=2) + self.scale_embed.to(h0.dtype)  # [B, T, S+1, d]
        z = self.norm(stack).view(B * T, -1, d)
        out = self.attn(z[:, :1], z, causal=False)
        return h0 + out.view(B, T, d)

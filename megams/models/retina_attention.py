"""Retina attention: full-resolution queries that see the recent past sharply and the far past pooled.

Levels s = 0..S with pool sizes K_0 = 1, K_1..K_S (`retina_factors`) and windows W_s
(`retina_windows`; W_0 in tokens, W_s in pooled blocks). Query i sees level s over the position
range [lo_s, hi_s), the ranges tiling [lo_S, i] with no gap and no overlap:

    hi_0 = i + 1
    lo_s = hi_s - W_s*K_s, rounded DOWN to a multiple of K_{s+1} (s < S), clipped at 0
    lo_S = hi_S - W_S*K_S clipped at 0 (`finite`), or 0 (`all`);   hi_{s+1} = lo_s

So level 0 holds at least the W_0 most recent tokens (plus up to K_1-1 more, to reach a K_1
boundary), and level s holds W_s (+ up to K_{s+1}/K_s - 1) whole, absolute-aligned K_s-blocks, each
ending before the finer levels begin. A pooled key/value is the average of that layer's input over
its block, projected by the same wk/wv; its rotary position is the block's last position.

Memory is n*(W_0 + sum W_s), not n^2: queries go in chunks of C, and each chunk gathers, per
level, one fixed-length window of keys covering what any of its queries may see; a per-(query,
key) mask picks the visible ones and ONE softmax runs over all levels' keys together.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megams.config.schema import ModelConfig
from megams.models.layers import apply_rotary, masked_attention


def level_bounds(i: torch.Tensor, factors: Sequence[int], windows: Sequence[int],
                 last_all: bool = False) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """For query positions `i` (LongTensor), per level s: (lo_s, hi_s), the positions it covers."""
    Ks = [1, *factors]
    S = len(factors)
    hi = i + 1
    out = []
    for s in range(S + 1):
        if s == S and last_all:
            lo = torch.zeros_like(hi)
        else:
            lo = hi - windows[s] * Ks[s]
            if s < S:
                lo = torch.div(lo, Ks[s + 1], rounding_mode="floor") * Ks[s + 1]
            lo = lo.clamp(min=0)
        out.append((lo, hi))
        hi = lo
    return out


def mean_visible_keys(factors: Sequence[int], windows: Sequence[int], last_all: bool, n: int) -> float:
    """Average number of keys (all levels) a query attends to over positions 0..n-1."""
    Ks = [1, *factors]
    bounds = level_bounds(torch.arange(n), factors, windows, last_all)
    total = sum(((hi - lo) // K).sum().item() for (lo, hi), K in zip(bounds, Ks))
    return total / max(n, 1)


@dataclass
class RetinaPlan:
    """Index and mask tensors for one sequence length (shared by every layer)."""
    chunk: int
    n_chunks: int
    index: List[Optional[torch.Tensor]]  # per level: [n_chunks, L_s] key index, or None if unused
    key_len: List[int]                   # per level: keys the level's tensor must be padded to
    mask: torch.Tensor                   # [n_chunks, chunk, sum_s L_s] bool, True = visible


@functools.lru_cache(maxsize=64)
def _plan(n: int, chunk: int, factors: Tuple[int, ...], windows: Tuple[int, ...], last_all: bool,
          device: str) -> RetinaPlan:
    # Plain (non-inference) tensors even under inference_mode: a cached plan may later feed backward.
    with torch.inference_mode(False), torch.no_grad():
        N = math.ceil(n / chunk)
        i = torch.arange(N * chunk).view(N, chunk)
        index, key_len, masks = [], [], []
        for (lo, hi), K in zip(level_bounds(i, factors, windows, last_all), [1, *factors]):
            start = lo[:, 0] // K                         # first block any query of the chunk sees
            end = -(-hi[:, -1] // K)                      # one past the last one
            L = int((end - start).max())
            if L <= 0:
                index.append(None)
                key_len.append(0)
                continue
            idx = start[:, None] + torch.arange(L)        # [N, L]
            b = idx[:, None, :]
            masks.append((lo[:, :, None] <= b * K) & ((b + 1) * K <= hi[:, :, None]))
            index.append(idx.to(device))
            key_len.append(int(idx.max()) + 1)
        return RetinaPlan(chunk, N, index, key_len, torch.cat(masks, dim=-1).to(device))


@torch.compiler.disable  # eager and cached (data-dependent sizes): a compiled block gets its tensors as inputs
def retina_plan(n: int, chunk: int, factors: Sequence[int], windows: Sequence[int], last_all: bool,
                device: torch.device) -> RetinaPlan:
    return _plan(n, chunk, tuple(factors), tuple(windows), last_all, str(device))


class RetinaAttention(nn.Module):
    """Drop-in for `Attention` inside a `Block` (same wq/wk/wv/wo, same forward(x) signature)."""

    def __init__(self, d_model: int, n_heads: int, factors: Sequence[int], windows: Sequence[int],
                 last_window: str = "finite", chunk: Optional[int] = None, dropout: float = 0.0,
                 rotary_base: Optional[float] = None):
        super().__init__()
        self.head_dim = d_model // n_heads
        self.factors = tuple(factors)
        self.windows = tuple(windows)
        self.last_all = last_window == "all"
        self.chunk = chunk or windows[0]
        self.dropout = dropout
        self.rotary_base = rotary_base
        self.wq = nn.Linear(d_model, d_model, bias=False)
        self.wk = nn.Linear(d_model, d_model, bias=False)
        self.wv = nn.Linear(d_model, d_model, bias=False)
        self.wo = nn.Linear(d_model, d_model, bias=False)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "RetinaAttention":
        return cls(cfg.d_model, cfg.n_heads, cfg.retina_factors, cfg.retina_windows, cfg.retina_last_window,
                   cfg.retina_chunk_size, cfg.dropout, cfg.rotary_base if cfg.positions == "rotary" else None)

    def _rotate(self, t: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:  # None: 0..n-1
        return t if self.rotary_base is None else apply_rotary(t, pos, self.rotary_base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, n, _ = x.shape
        hd, dev = self.head_dim, x.device
        plan = retina_plan(n, self.chunk, self.factors, self.windows, self.last_all, dev)
        N, C = plan.n_chunks, plan.chunk

        q = self._rotate(self.wq(x).view(B, n, -1, hd), None)
        keys, values = [], []
        for K, idx, length in zip([1, *self.factors], plan.index, plan.key_len):
            if idx is None:
                continue
            if K == 1:
                xs, pos = x, None
            else:  # absolute-aligned blocks; a partial last block is never visible (it ends after i)
                nb = math.ceil(n / K)
                xs = F.pad(x, (0, 0, 0, nb * K - n)).view(B, nb, K, -1).mean(dim=2)
                pos = torch.arange(nb, device=dev) * K + (K - 1)
            m = xs.shape[1]
            k = self._rotate(self.wk(xs).view(B, m, -1, hd), pos)
            v = self.wv(xs).view(B, m, -1, hd)
            if length > m:
                k, v = F.pad(k, (0, 0, 0, 0, 0, length - m)), F.pad(v, (0, 0, 0, 0, 0, length - m))
            flat = idx.reshape(-1)
            keys.append(k.index_select(1, flat).view(B, N, idx.shape[1], -1, hd))
            values.append(v.index_select(1, flat).view(B, N, idx.shape[1], -1, hd))

        q = F.pad(q, (0, 0, 0, 0, 0, N * C - n)).view(B, N, C, -1, hd)
        # [B, H, N, C|L, hd]; one softmax over every level's keys, masked per (query, key)
        y = masked_attention(  # SDPA with the dense mask, or flex_attention with its block mask
            q.permute(0, 3, 1, 2, 4), torch.cat(keys, dim=2).permute(0, 3, 1, 2, 4),
            torch.cat(values, dim=2).permute(0, 3, 1, 2, 4), plan.mask,
            dropout_p=self.dropout if self.training else 0.0)
        y = y.permute(0, 2, 3, 1, 4).reshape(B, N * C, -1)[:, :n]
        return self.wo(y)

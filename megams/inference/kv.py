"""Key/value caches and one-position attention steps that reuse a model's own attention modules.

`attention_step` is `Attention.forward` for ONE new query position that attends to every cached one
(causal by construction); `RetinaState.step` is `RetinaAttention.forward` for one query: the same
windows (`level_bounds`), the same pooled keys (the mean of the layer's input over an aligned
block, projected by wk / wv, rotary at the block's last position), one softmax over all levels.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F

from megams.models.layers import apply_rotary
from megams.models.retina_attention import level_bounds


class KVBuffer:
    """Keys and values [B, H, n, hd] of positions base..base+n-1 (absolute), growing by doubling;
    `trim(lo)` forgets positions before `lo` (what no later query can see)."""

    def __init__(self):
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None
        self.base = 0     # absolute index of the first kept entry
        self.start = 0    # its slot in the buffer
        self.n = 0        # slots used (from 0)

    @property
    def end(self) -> int:
        """One past the last absolute index held."""
        return self.base + self.n - self.start

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        t = k.shape[2]
        if self.k is None:
            cap = max(16, t)
            self.k = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
            self.v = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
        elif self.n + t > self.k.shape[2]:
            live = self.n - self.start
            cap = max(2 * live + t, 16)
            k_new = self.k.new_empty(self.k.shape[0], self.k.shape[1], cap, self.k.shape[3])
            v_new = self.v.new_empty(self.v.shape[0], self.v.shape[1], cap, self.v.shape[3])
            k_new[:, :, :live] = self.k[:, :, self.start:self.n]
            v_new[:, :, :live] = self.v[:, :, self.start:self.n]
            self.k, self.v, self.start, self.n = k_new, v_new, 0, live
        self.k[:, :, self.n:self.n + t] = k
        self.v[:, :, self.n:self.n + t] = v
        self.n += t

    def get(self, lo: Optional[int] = None, hi: Optional[int] = None):
        """Keys, values of absolute indices [lo, hi) (default: all held)."""
        lo = self.base if lo is None else lo
        hi = self.end if hi is None else hi
        a, b = self.start + lo - self.base, self.start + hi - self.base
        return self.k[:, :, a:b], self.v[:, :, a:b]

    def trim(self, lo: int) -> None:
        if lo > self.base:
            drop = min(lo, self.end) - self.base
            self.start += drop
            self.base += drop


def _heads(linear, x: torch.Tensor, hd: int) -> torch.Tensor:
    B, T, _ = x.shape
    return linear(x).view(B, T, -1, hd)


def _rot(t: torch.Tensor, pos: torch.Tensor, base: Optional[float]) -> torch.Tensor:
    return t if base is None else apply_rotary(t, pos, base)


def _rot_pair(q: torch.Tensor, k: torch.Tensor, pos: int, base: Optional[float]):
    """Rotate a query and a key of the same position with one rotary call (heads concatenated)."""
    if base is None:
        return q, k
    qk = apply_rotary(torch.cat([q, k], dim=2), torch.tensor([pos], device=q.device), base)
    return qk.split([q.shape[2], k.shape[2]], dim=2)


def attention_step(attn, x: torch.Tensor, pos: int, cache: KVBuffer) -> torch.Tensor:
    """`attn` (megams.models.layers.Attention, causal self-attention) for the query at `pos`
    (x: [B, 1, d], the attention's input); appends this position's key/value to `cache` first."""
    hd, base = attn.head_dim, attn.rotary_base
    q, k = _rot_pair(_heads(attn.wq, x, hd), _heads(attn.wk, x, hd), pos, base)
    v = _heads(attn.wv, x, hd)
    cache.append(k.transpose(1, 2), v.transpose(1, 2))
    keys, values = cache.get()
    y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values)
    return attn.wo(y.transpose(1, 2).reshape(x.shape[0], 1, -1))


class RetinaState:
    """One RetinaAttention layer's cache: full-resolution keys/values (level 0), the keys/values of
    every complete pooled block per level, and the layer inputs of the blocks still filling up."""

    def __init__(self, attn):
        self.attn = attn
        self.Ks = [1, *attn.factors]
        self.levels = [KVBuffer() for _ in self.Ks]
        self.recent: List[torch.Tensor] = []  # the last max(K) inputs [B, d]

    def step(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        a, hd, base = self.attn, self.attn.head_dim, self.attn.rotary_base
        dev = x.device
        q, k = _rot_pair(_heads(a.wq, x, hd), _heads(a.wk, x, hd), pos, base)
        self.levels[0].append(k.transpose(1, 2), _heads(a.wv, x, hd).transpose(1, 2))
        self.recent.append(x[:, 0])
        self.recent = self.recent[-self.Ks[-1]:]
        for K, buf in zip(self.Ks[1:], self.levels[1:]):
            if (pos + 1) % K == 0:  # block pos // K is complete: pool it as the model does
                xs = torch.stack(self.recent[-K:], dim=1).mean(dim=1, keepdim=True)   # [B, 1, d]
                kp = _rot(_heads(a.wk, xs, hd), torch.tensor([pos], device=dev), base)
                buf.append(kp.transpose(1, 2), _heads(a.wv, xs, hd).transpose(1, 2))
        keys, values = [], []
        bounds = level_bounds(torch.tensor([pos]), a.factors, a.windows, a.last_all)
        for (lo, hi), K, buf in zip(bounds, self.Ks, self.levels):
            lo, hi = int(lo) // K, int(hi) // K  # aligned to K for every pooled level
            buf.trim(lo)                         # queries only move forward: lo never decreases
            if hi > lo:
                kk, vv = buf.get(lo, hi)
                keys.append(kk)
                values.append(vv)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), torch.cat(keys, dim=2), torch.cat(values, dim=2))
        return a.wo(y.transpose(1, 2).reshape(x.shape[0], 1, -1))

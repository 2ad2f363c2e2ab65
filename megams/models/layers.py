"""The transformer pieces every model is built from: norms, rotary positions, attention, MLP, Block.

Tensor-parallel friendliness is a rule here, not an afterthought: projections are separate
`nn.Linear`s without bias (`wq`, `wk`, `wv`, `wo`; `fc_in`/`fc_out`; `w_gate`/`w_up`/`w_down`) and
head reshapes use `view(B, T, -1, head_dim)`, so a shard that holds fewer heads (column-parallel
q/k/v, row-parallel out) runs this code unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megams.config.schema import ModelConfig


# Fused norm classes (NVIDIA apex's FusedLayerNorm / FusedRMSNorm), installed by
# megams.training.kernels.KernelChoice.install(); None: torch's. Same parameter names (weight, bias).
_FUSED_NORMS: dict = {"layernorm": None, "rmsnorm": None}


def set_norm_classes(layernorm: Optional[type], rmsnorm: Optional[type]) -> None:
    """The classes `make_norm` builds from now on (None: torch's nn.LayerNorm / nn.RMSNorm)."""
    _FUSED_NORMS.update(layernorm=layernorm, rmsnorm=rmsnorm)


def make_norm(cfg: ModelConfig) -> nn.Module:
    fused = _FUSED_NORMS.get(cfg.norm)
    if fused is not None:
        return fused(cfg.d_model, eps=cfg.norm_eps)
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


# --- rotary positions ---------------------------------------------------------------------------
def rotary_cos_sin(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [len(positions), head_dim/2] (fp32). Positions are any integers: coarse
    scales pass 0..n/K-1, retina pooled keys pass their block's last position."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


_ROTARY_TABLES: dict = {}  # (length, head_dim, base, device) -> full-width fp32 tables (see rotary_tables)


def rotary_tables(length: int, head_dim: int, base: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The full-width tables `_rotate` uses for positions 0..length-1: [cos, cos] and [-sin, sin] of
    `rotary_cos_sin(torch.arange(length), head_dim, base)`, shape [length, head_dim], cached: the same
    tensors (the same values, bit for bit) for every layer and step. Under torch.compile (the graph
    computes them) and inference_mode (tensors that could not be saved for a later backward) they
    are not cached."""
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return _full_width(*rotary_cos_sin(torch.arange(length, device=device), head_dim, base))
    key = (int(length), int(head_dim), float(base), torch.device(device))
    hit = _ROTARY_TABLES.get(key)
    if hit is None:
        if len(_ROTARY_TABLES) >= 64:
            _ROTARY_TABLES.clear()
        with torch.no_grad():
            hit = _ROTARY_TABLES[key] = _full_width(*rotary_cos_sin(torch.arange(length, device=device), head_dim, base))
    return hit


def _full_width(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rotary(x: torch.Tensor, positions: Optional[torch.Tensor], base: float) -> torch.Tensor:
    """Rotate x [B, T, ..., head_dim] (any head dims between T and head_dim: [B, T, H, E], or q and
    k together as [B, T, 2, H, E]) by its positions [T] (half-split / GPT-NeoX layout), in fp32.
    `positions=None`: 0..T-1 (cached tables, `rotary_tables`)."""
    if positions is None:
        cos, sin = rotary_tables(x.shape[1], x.shape[-1], base, x.device)
    else:
        cos, sin = _full_width(*rotary_cos_sin(positions, x.shape[-1], base))
    return _rotate(x, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * [cos, cos] + [x2, x1] * [-sin, sin] = [x1 cos - x2 sin, x2 cos + x1 sin]: one cat, one mul,
    one addcmul (forward and backward) on the whole tensor instead of six ops on its halves."""
    shape = (x.shape[1],) + (1,) * (x.dim() - 3) + (x.shape[-1],)  # broadcast over the head dims
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return torch.addcmul(xf * cos.view(shape), torch.cat([x2, x1], dim=-1), sin.view(shape)).type_as(x)


# --- attention ----------------------------------------------------------------------------------
# Attention under a dense boolean mask (upsampling attention, retina) rules out SDPA's flash kernel on
# GPU; torch's flex_attention with a block mask skips the fully masked tiles instead. "auto": flex on
# CUDA (compiled), SDPA elsewhere; "flex": also on CPU (eager, forward only: torch has no CPU backward
# for it; tests compare it with SDPA there);
# "sdpa": today's dense-mask SDPA. Dropout in the attention probabilities always takes SDPA.
_MASKED_KERNEL = {"kind": "auto"}
_BLOCK_MASKS: "dict" = {}   # (shape, device, heads) -> (mask, BlockMask): the same mask every layer/step
_COMPILED_FLEX: list = []


def set_masked_attention(kind: str) -> None:
    if kind not in ("auto", "flex", "sdpa"):
        raise ValueError(f"masked attention kernel: expected auto | flex | sdpa, got {kind!r}")
    _MASKED_KERNEL["kind"] = kind


def _flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401  (torch >= 2.5)
        return True
    except ImportError:
        return False


def _use_flex(q: torch.Tensor, dropout_p: float, needs_grad: bool = False) -> bool:
    kind = _MASKED_KERNEL["kind"]
    if kind == "sdpa" or dropout_p > 0 or not _flex_available():
        return False
    if q.is_cuda:
        return True
    return kind == "flex" and not needs_grad  # torch's CPU flex_attention has no backward


def _block_mask(mask: torch.Tensor, heads: int, groups: int):
    """flex's BlockMask for `mask` [groups, Tq, Tk] (head h' of the merged heads x groups uses group
    h' % groups), cached while the same mask comes back (compared by value: it is small)."""
    from torch.nn.attention.flex_attention import create_block_mask
    key = (tuple(mask.shape), str(mask.device), heads)
    hit = _BLOCK_MASKS.get(key)
    if hit is not None and torch.equal(hit[0], mask):
        return hit[1]
    dense = mask.detach().clone()
    Tq, Tk = dense.shape[-2:]

    def mask_mod(b, h, q_idx, kv_idx):
        return dense[h % groups, q_idx, kv_idx]

    bm = create_block_mask(mask_mod, None, heads if groups > 1 else None, Tq, Tk, device=str(mask.device))
    if len(_BLOCK_MASKS) >= 16:
        _BLOCK_MASKS.clear()
    _BLOCK_MASKS[key] = (dense, bm)
    return bm


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(E)) v where `mask` (True = may attend) allows it.

    q [B, H, *G, Tq, E], k/v [B, H, *G, Tk, E], mask [*G, Tq, Tk] (G: extra batch dims shared by
    every sequence and head, e.g. retina's chunks). SDPA with the dense mask, or flex_attention with
    a block mask (see `set_masked_attention`): the same function (tests/models/test_flex_attention.py)."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if not _use_flex(q, dropout_p, needs_grad):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    from torch.nn.attention.flex_attention import flex_attention
    B, H = q.shape[:2]
    Tq, Tk, E = q.shape[-2], k.shape[-2], q.shape[-1]
    groups = mask[..., 0, 0].numel()
    mask3 = mask.reshape(groups, Tq, Tk)
    heads = H * groups
    q4, k4, v4 = (t.reshape(B, heads, t.shape[-2], E) for t in (q, k, v))
    fn = flex_attention
    if q.is_cuda:  # eager flex materialises the scores; compiled, it is one fused kernel
        if not _COMPILED_FLEX:
            _COMPILED_FLEX.append(torch.compile(flex_attention, dynamic=False))
        fn = _COMPILED_FLEX[0]
    y = fn(q4, k4, v4, block_mask=_block_mask(mask3, heads, groups))
    return y.reshape(q.shape[:-1] + (v.shape[-1],))


class Attention(nn.Module):
    """Multi-head attention; causal self-attention by default, or x attending to `context`
    under a boolean `mask` [Tq, Tk] (True = may attend). `rotary_base=None` disables rotary."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, rotary_base: Optional[float] = None,
                 fused_qkv: bool = True):
        super().__init__()
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.rotary_base = rotary_base
        self.fused_qkv = fused_qkv
        self.wq = nn.Linear(d_model, d_model, bias=False)
        self.wk = nn.Linear(d_model, d_model, bias=False)
        self.wv = nn.Linear(d_model, d_model, bias=False)
        self.wo = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, *, causal: bool = True,
                mask: Optional[torch.Tensor] = None, q_pos: Optional[torch.Tensor] = None,
                k_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        ctx = x if context is None else context
        B, T, _ = x.shape
        S = ctx.shape[1]
        rotate = self.rotary_base is not None
        if context is None and self.fused_qkv and _fusable(self.wq, self.wk, self.wv):
            # one [B*T, d] @ [d, 3d'] matmul; d' = this rank's heads under tensor parallelism, where each
            # projection is a column layer whose input is already in the region (a plain F.linear)
            w = torch.cat([self.wq.weight, self.wk.weight, self.wv.weight])
            qkv = F.linear(x, w).view(B, T, 3, -1, self.head_dim)
            q, k, v = qkv.unbind(2)
            if rotate:  # rotary makes new q and k: a v that is a view would keep all of qkv alive for backward
                v = v.contiguous()
                if q_pos is None and k_pos is None:  # q and k rotated together, one set of ops
                    q, k = apply_rotary(qkv[:, :, :2], None, self.rotary_base).unbind(2)
                    rotate = False
        else:
            q = self.wq(x).view(B, T, -1, self.head_dim)
            k = self.wk(ctx).view(B, S, -1, self.head_dim)
            v = self.wv(ctx).view(B, S, -1, self.head_dim)
        if rotate:
            q = apply_rotary(q, q_pos, self.rotary_base)  # None: 0..T-1, cached tables
            k = apply_rotary(k, k_pos, self.rotary_base)
        dropout_p = self.dropout if self.training else 0.0
        if mask is not None:  # a dense boolean mask: flex_attention's block mask where it is available
            y = masked_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, dropout_p)
        else:
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=causal, dropout_p=dropout_p)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


def _fusable(*projections: nn.Module) -> bool:
    """q/k/v projections that are a bare `F.linear(x, weight)`: no bias, no communication of their own
    (an nn.Linear, or a tensor-parallel column layer whose input is already in the region and whose
    output stays split), and weights that are whole on this rank (not ZeRO-3 partitions, which
    DeepSpeed gathers only when the projection's own forward runs)."""
    for m in projections:
        if m.bias is not None or getattr(m, "gather_output", False) or not getattr(m, "input_in_region", True):
            return False
        if hasattr(m.weight, "ds_id"):
            return False
    return True


def make_attention(cfg: ModelConfig, rotary: bool = True) -> Attention:
    base = cfg.rotary_base if (rotary and cfg.positions == "rotary") else None
    return Attention(cfg.d_model, cfg.n_heads, cfg.dropout, base, cfg.fused_qkv)


# --- MLP ----------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f = cfg.d_model, cfg.ffn_size
        self.kind = cfg.mlp
        if self.kind == "swiglu":
            self.w_gate = nn.Linear(d, f, bias=False)
            self.w_up = nn.Linear(d, f, bias=False)
            self.w_down = nn.Linear(f, d, bias=False)
        else:
            self.fc_in = nn.Linear(d, f, bias=False)
            self.fc_out = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
        return self.fc_out(F.gelu(self.fc_in(x)))


# --- Block --------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm transformer layer. `attention` replaces the causal self-attention (retina)."""

    def __init__(self, cfg: ModelConfig, attention: Optional[nn.Module] = None):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = attention if attention is not None else make_attention(cfg)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


def make_blocks(cfg: ModelConfig, n: int) -> nn.ModuleList:
    return nn.ModuleList(Block(cfg) for _ in range(n))

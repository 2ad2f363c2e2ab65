"""What a model costs, computed from its config alone: parameters, FLOPs, activation memory.

`layer_costs(cfg, seq_len)` is the single source: one record per pipeline-cuttable piece, in
execution order, named by its module path in the built model. Everything else sums it.

FLOPs are the model's useful matmul FLOPs (2 per multiply-add), fwd+bwd = 3 x fwd:
  - projections / MLP / head: 2 * rows * in * out, where rows = positions at that layer's scale
    (n / K_s: coarse scales really are cheaper);
  - attention core (QK^T and PV): 2 * 2 * d per (query, visible key) pair: causal self-attention
    counts n(n+1)/2 pairs, retina the keys its windows make visible (exactly, position by position),
    attention upsampling the coarse positions each fine one may see, the aggregation S+1 per position.
Norms, softmax, rotary and pooling averages are not counted (they are not matmuls).

Activation bytes are an estimate of what autograd saves for backward (calibrated against
`saved_tensor_bytes` on CPU): per position ~ `_BLOCK_D` * d + (2 | 4) * ffn elements for a block,
plus what the layer's attention kernel keeps (retina: its gathered key windows and probabilities).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, List

import torch

from megams.config.schema import ModelConfig
from megams.models.retina_attention import mean_visible_keys, retina_plan

_BLOCK_D = 8  # saved elements per position per block, in units of d (norm inputs, q/k/v, attention output)


@dataclass(frozen=True)
class LayerCost:
    name: str                # module path in the built model ("embed", "scale_blocks.1.0", "head", ...)
    kind: str                # embed | block | shorten | upsample | aggregate | head
    scale: int               # 0 = full resolution
    seq_len: int             # positions this layer runs over (for one sequence of `seq_len` tokens)
    flops: float             # fwd+bwd FLOPs for one sequence
    activation_bytes: float  # saved-for-backward bytes for one sequence (estimate)
    params: int              # parameters owned (tied head weight counted once, in `embed`)
    # how `activation_bytes` splits (for tensor parallelism and activation checkpointing):
    sharded_bytes: float = 0.0  # ... the part a tensor-parallel layer splits over the tensor ranks (heads, MLP, vocab)
    attn_bytes: float = 0.0     # ... the part the attention sublayer saves (recomputed by mode=attention; sharded)
    input_bytes: float = 0.0    # what a checkpointed block keeps instead: its input


# --- parameters -------------------------------------------------------------------------------
def _norm_params(cfg: ModelConfig) -> int:
    return cfg.d_model * (2 if cfg.norm == "layernorm" else 1)


def _attn_params(cfg: ModelConfig) -> int:
    return 4 * cfg.d_model ** 2


def _mlp_params(cfg: ModelConfig) -> int:
    return (3 if cfg.mlp == "swiglu" else 2) * cfg.d_model * cfg.ffn_size


def _block_params(cfg: ModelConfig) -> int:
    return 2 * _norm_params(cfg) + _attn_params(cfg) + _mlp_params(cfg)


# --- per-layer FLOPs (forward) and saved elements ---------------------------------------------
def _mlp_flops(cfg: ModelConfig, rows: int) -> float:
    return 2.0 * rows * _mlp_params(cfg)


def _block(cfg: ModelConfig, L: int, key_pairs: float, extra_flops: float = 0.0,
           extra_elems: float = 0.0) -> tuple[float, float]:
    """(forward flops, saved elements) of one Block over L positions with `key_pairs` (q, k) pairs."""
    flops, parts = _block_parts(cfg, L, key_pairs, extra_flops, extra_elems)
    return flops, sum(parts.values())


def _block_parts(cfg: ModelConfig, L: int, key_pairs: float, extra_flops: float = 0.0,
                 extra_elems: float = 0.0) -> tuple[float, dict]:
    """Forward flops and the saved elements of one Block, by part: `norm` (the residual stream:
    both norms' inputs and outputs, replicated over tensor ranks), `attn` (q, k, v, the attention
    output and its per-head statistics, + retina's gathered windows: split by heads), `mlp`
    (the hidden activations: split)."""
    d = cfg.d_model
    flops = 2.0 * L * 4 * d * d + _mlp_flops(cfg, L) + 4.0 * d * key_pairs + extra_flops
    ffn_saved = (4 if cfg.mlp == "swiglu" else 2) * cfg.ffn_size
    norm_saved = 2 * d if cfg.norm == "rmsnorm" else 0  # torch's RMSNorm also keeps its normalised input
    half = _BLOCK_D // 2
    parts = {"norm": L * (half * d + norm_saved), "attn": L * (half * d + 4 * cfg.n_heads) + extra_elems,
             "mlp": L * ffn_saved}
    return flops, parts


def _retina_block(cfg: ModelConfig, L: int, parts: bool = False):
    last_all = cfg.retina_last_window == "all"
    pairs = mean_visible_keys(cfg.retina_factors, cfg.retina_windows, last_all, L) * L
    pooled = sum(math.ceil(L / K) for K in cfg.retina_factors)
    pool_flops = 2.0 * pooled * 2 * cfg.d_model ** 2  # wk, wv on the pooled inputs
    plan = retina_plan(L, cfg.retina_chunk_size or cfg.retina_windows[0], cfg.retina_factors,
                       cfg.retina_windows, last_all, torch.device("cpu"))
    keys = plan.mask.shape[-1]  # gathered keys per chunk, all levels
    # per chunk: gathered k and v windows (2 * keys * d) + probabilities (H * chunk * keys), in place
    # of the plain k and v a causal block keeps (2 * d per position)
    extra = plan.n_chunks * (2 * keys * cfg.d_model + cfg.n_heads * plan.chunk * keys) - 2 * L * cfg.d_model
    return (_block_parts if parts else _block)(cfg, L, pairs, pool_flops, extra)


def _shorten(cfg: ModelConfig, L_in: int, k: int) -> tuple[float, float, int]:
    d, m = cfg.d_model, L_in // k
    params = d if cfg.shift_pad == "learned" else 0
    kind = cfg.pooling_kind
    flops, elems = 0.0, float(L_in * d)  # the shifted copy
    if kind == "linear":
        params += k * d * d
        flops += 2.0 * m * k * d * d
    elif kind == "attention":
        params += 2 * _norm_params(cfg) + _attn_params(cfg) + _mlp_params(cfg)
        flops += 2.0 * m * (2 * d * d + 2 * k * d * d) + 4.0 * d * m * k + _mlp_flops(cfg, m)
        elems += 5 * L_in * d + m * (8 * d + 2 * cfg.ffn_size)
    return flops, elems, params


def _upsample(cfg: ModelConfig, m: int, K: int, merge: bool = False) -> tuple[float, float, int]:
    f, e, p = _upsample_core(cfg, m, K)
    if merge and cfg.scale_merge != "none":  # scales.Merge on the m coarse positions: keeps its input
        p += _norm_params(cfg) if cfg.scale_merge == "norm" else cfg.d_model
        e += m * cfg.d_model
    return f, e, p


def _upsample_core(cfg: ModelConfig, m: int, K: int) -> tuple[float, float, int]:
    d, L = cfg.d_model, m * K
    if cfg.upsampling == "linear":
        return 2.0 * m * d * K * d, float(m * d), K * d * d
    if cfg.upsampling == "attention":
        pairs = K * m * (m + 1) / 2  # fine i sees coarse 0..floor(i/K)
        flops = 2.0 * (2 * L * d * d + 2 * m * d * d) + 4.0 * d * pairs
        return flops, float(6 * L * d + 2 * m * d + cfg.n_heads * L), 2 * _norm_params(cfg) + _attn_params(cfg)
    return 0.0, 0.0, 0


def _aggregate(cfg: ModelConfig, L: int, n_scales: int) -> tuple[float, float, int]:
    d = cfg.d_model
    if cfg.aggregation == "sum":
        return 0.0, 0.0, 0
    flops = 2.0 * L * (2 * d * d + 2 * n_scales * d * d) + 4.0 * d * n_scales * L
    elems = L * (4 * n_scales * d + 4 * d)
    return flops, elems, n_scales * d + _norm_params(cfg) + _attn_params(cfg)


def _shorten_sharded(cfg: ModelConfig, L_in: int, elems: float) -> float:
    """Saved elements of a shortening that tensor parallelism splits (attention pooling's
    projections and MLP, about half of what it keeps beyond the shifted copy)."""
    return (elems - L_in * cfg.d_model) / 2 if cfg.pooling_kind == "attention" else 0.0


def _upsample_sharded(cfg: ModelConfig, L: int) -> float:
    """Attention upsampling: q, k, v, output and per-head statistics are split by heads."""
    return float(4 * L * cfg.d_model + cfg.n_heads * L) if cfg.upsampling == "attention" else 0.0


# --- the ordered list -------------------------------------------------------------------------
def layer_costs(cfg: ModelConfig, seq_len: int, bytes_per_element: int = 2) -> List[LayerCost]:
    """Per-layer costs of one sequence of `seq_len` tokens, in execution order (what a pipeline
    partitioner balances). `seq_len` is padded up to a multiple of K_S as `forward` does."""
    K_S = cfg.total_shortening
    n = -(-seq_len // K_S) * K_S
    d, V = cfg.d_model, cfg.vocab_size
    b = bytes_per_element
    out: List[LayerCost] = []

    def add(name, kind, scale, L, flops, elems, params, sharded=0.0, attn=0.0, inp=0.0):
        out.append(LayerCost(name, kind, scale, L, 3.0 * flops, float(elems) * b, int(params),
                             float(sharded) * b, float(attn) * b, float(inp) * b))

    def add_block(name, scale, L, f, parts):
        add(name, "block", scale, L, f, sum(parts.values()), _block_params(cfg),
            parts["attn"] + parts["mlp"], parts["attn"], L * d)

    def blocks(prefix, count, scale, L):
        for i in range(count):
            f, parts = _block_parts(cfg, L, L * (L + 1) / 2)
            add_block(f"{prefix}.{i}", scale, L, f, parts)

    emb_params = V * d + (cfg.max_seq_len * d if cfg.positions == "learned" else 0)
    add("embed", "embed", 0, n, 0.0, 0.0, emb_params)

    ks = cfg.shorten_factors
    lens = [n // math.prod(ks[:s]) for s in range(len(ks) + 1)]
    if cfg.type == "vanilla":
        blocks("blocks", cfg.n_layers, 0, n)
    elif cfg.type == "retina":
        for i in range(cfg.n_layers):
            f, parts = _retina_block(cfg, n, parts=True)
            add_block(f"blocks.{i}", 0, n, f, parts)
    elif cfg.type == "bottom_up":
        blocks("scale_blocks.0", cfg.layers_per_scale[0], 0, n)
        for s in range(1, len(ks) + 1):
            f, e, p = _shorten(cfg, lens[s - 1], ks[s - 1])
            add(f"shorten.{s - 1}", "shorten", s, lens[s], f, e, p, _shorten_sharded(cfg, lens[s - 1], e))
            blocks(f"scale_blocks.{s}", cfg.layers_per_scale[s], s, lens[s])
        for s in range(1, len(ks) + 1):
            f, e, p = _upsample(cfg, lens[s], n // lens[s], merge=cfg.aggregation == "sum")
            add(f"upsample.{s - 1}", "upsample", 0, n, f, e, p, _upsample_sharded(cfg, n))
        f, e, p = _aggregate(cfg, n, len(ks) + 1)
        add("aggregate", "aggregate", 0, n, f, e, p, e / 2)  # q, k, v and the output split by heads; inputs replicated
        blocks("post_blocks", cfg.n_post, 0, n)
    elif cfg.type == "top_down":
        blocks("pre_blocks", cfg.n_pre, 0, n)
        for s in range(1, len(ks) + 1):
            f, e, p = _shorten(cfg, lens[s - 1], ks[s - 1])
            add(f"shorten.{s - 1}", "shorten", s, lens[s], f, e, p, _shorten_sharded(cfg, lens[s - 1], e))
        for s in reversed(range(len(ks) + 1)):
            if s < len(ks):
                f, e, p = _upsample(cfg, lens[s + 1], ks[s], merge=True)
                add(f"upsample.{s}", "upsample", s, lens[s], f, e, p, _upsample_sharded(cfg, lens[s]))
            blocks(f"scale_blocks.{s}", cfg.layers_per_scale[s], s, lens[s])
    else:
        raise ValueError(f"unknown model.type {cfg.type!r}")

    head_params = _norm_params(cfg) + (0 if cfg.tie_embeddings else V * d)
    # head: norm_f and head inputs + the loss's fp32 log-softmax (4 bytes whatever the precision)
    add("head", "head", 0, n, 2.0 * n * d * V, n * (2 * d + V * 4 / b), head_params, n * V * 4 / b)
    return out


def param_count(cfg: ModelConfig) -> int:
    return sum(c.params for c in layer_costs(cfg, cfg.total_shortening))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (fwd+bwd) FLOPs per token at this sequence length."""
    return sum(c.flops for c in layer_costs(cfg, seq_len)) / seq_len


def activation_bytes_per_token(cfg: ModelConfig, seq_len: int, bytes_per_element: int = 2) -> float:
    """Estimated saved-for-backward bytes per token (no activation checkpointing)."""
    return sum(c.activation_bytes for c in layer_costs(cfg, seq_len, bytes_per_element)) / seq_len


# --- measuring --------------------------------------------------------------------------------
def saved_tensor_bytes(fn: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes autograd saves for backward while running `fn()`, each storage counted once;
    storages of `exclude` (e.g. the parameters) are not counted."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()  # kept alive while counting: a saved storage cannot be freed and its address reused
    total = sum(seen.values())
    del out
    return total

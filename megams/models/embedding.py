"""Token embedding, optional learned absolute positions, and the LM head (tied to the embedding).

`embed` stays a plain `nn.Embedding` and `head` a plain `nn.Linear` so tensor parallelism can swap
them for vocab-parallel versions from outside; tying shares one Parameter (`embed.weight`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megams.config.schema import ModelConfig


def make_token_embedding(cfg: ModelConfig) -> nn.Embedding:
    return nn.Embedding(cfg.vocab_size, cfg.d_model)


def make_position_embedding(cfg: ModelConfig) -> Optional[nn.Embedding]:
    return nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positions == "learned" else None


def make_head(cfg: ModelConfig) -> nn.Linear:
    return nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)


def check_length(cfg: ModelConfig, seq_len: int) -> None:
    """Learned positions have a finite table: refuse longer inputs with a message naming the knob."""
    if cfg.positions == "learned" and seq_len > cfg.max_seq_len:
        raise ValueError(f"input length {seq_len} exceeds model.max_seq_len={cfg.max_seq_len} "
                         f"(learned positions); raise model.max_seq_len or use model.positions=rotary")


def embed_tokens(embed: nn.Module, pos_embed: Optional[nn.Module], tokens: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T, d]. Positions past the table (only right padding can get there) are clamped:
    their outputs are cropped and, by causality, never reach a real position."""
    x = embed(tokens)
    if pos_embed is not None:
        pos = torch.arange(tokens.shape[1], device=tokens.device).clamp(max=pos_embed.num_embeddings - 1)
        x = x + pos_embed(pos)
    return x

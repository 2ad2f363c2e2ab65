"""What all four models share: embedding in, norm + head out, and any-length inference.

A subclass builds its body in `__init__` (after calling `super().__init__(cfg)`) and implements
`_hidden(x) -> x` on embedded inputs whose length is a multiple of `cfg.total_shortening`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megams.config.schema import ModelConfig
from megams.models.embedding import (check_length, embed_tokens, make_head, make_position_embedding,
                                     make_token_embedding)
from megams.models.layers import Block, make_norm


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = make_token_embedding(cfg)
        self.pos_embed = make_position_embedding(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.norm_f = make_norm(cfg)
        self.head = make_head(cfg)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share `embed.weight` with `head.weight` (call again after anything that re-creates params)."""
        if self.cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    @property
    def num_layers(self) -> int:
        """Transformer blocks in the model (sets the output-projection init scale)."""
        return sum(1 for m in self.modules() if isinstance(m, Block))

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> final normed hidden states [B, T, d] (apply a (parallel) head outside)."""
        T = tokens.shape[1]
        check_length(self.cfg, T)
        K = self.cfg.total_shortening
        pad = (-T) % K
        if pad:  # right padding is exact: causality keeps it out of every real position
            tokens = F.pad(tokens, (0, pad))
        x = self.drop(embed_tokens(self.embed, self.pos_embed, tokens))
        x = self._hidden(x)[:, :T]
        return self.norm_f(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_hidden(tokens))

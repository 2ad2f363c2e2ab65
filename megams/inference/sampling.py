"""Sampling the next token (temperature, top-k, top-p) and the generation loop."""
from __future__ import annotations

import time
from typing import Optional

import torch

from megams.inference.decoders import make_decoder


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. temperature 0 = greedy; top_k 0 = off; top_p 1 = off."""
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0 (got {temperature}, {top_p}, {top_k})")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: Optional[int] = None, cache: bool = True, vocab_limit: Optional[int] = None,
             stats: Optional[dict] = None) -> torch.Tensor:
    """prompt [B, T0] (T0 >= 1) -> [B, T0 + max_new_tokens]. `vocab_limit` masks ids >= it (a model
    vocabulary larger than the tokenizer's). `stats` (a dict) receives prefill / decode times."""
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError("prompt must be a [B, T] tensor with T >= 1")
    gen = torch.Generator(device=prompt.device)
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()
    dec = make_decoder(model, cache=cache)
    t0 = time.perf_counter()
    for t in range(prompt.shape[1]):
        logits = dec.step(prompt[:, t])
    t1 = time.perf_counter()
    out = [prompt]
    for _ in range(max_new_tokens):
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits[:, vocab_limit:] = float("-inf")
        nxt = sample_next(logits, temperature, top_k, top_p, gen)
        out.append(nxt[:, None])
        if len(out) - 1 < max_new_tokens:
            logits = dec.step(nxt)
    t2 = time.perf_counter()
    if stats is not None:
        stats.update(prefill_s=t1 - t0, decode_s=t2 - t1, prompt_tokens=prompt.numel(),
                     new_tokens=max_new_tokens * prompt.shape[0],
                     tokens_per_s=max_new_tokens * prompt.shape[0] / max(t2 - t1, 1e-9))
    return torch.cat(out, dim=1)

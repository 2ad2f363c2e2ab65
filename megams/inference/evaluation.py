"""Perplexity and bits per byte of a model over a token stream, with sliding windows.

Windows of `seq_len` input tokens start every `stride` tokens from `start`; window w reads tokens
[s, s + seq_len) and predicts [s + 1, s + seq_len + 1) (s = start + w * stride), and scores only the
targets no earlier window scored, so every scored token is counted once, with as much context as
the window leaves it:
- stride = seq_len: consecutive chunks, every token after `start` predicted once (the first of each
  chunk with context from the previous one's last token only);
- stride < seq_len: overlapping windows, each scoring its last `stride` targets with at least
  seq_len - stride tokens of context (slower, closer to the model's long-context loss);
- stride = seq_len + 1: the training run's validation windows (seq_len + 1 tokens each, the first
  token never a target): reproduces its val_loss / val_bpb.
Bits per byte use the source bytes the scored targets stand for (`bytes_before(positions)`, e.g.
IndexedDataset.source_bytes_before: exact whatever the tokenizer).
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F


def windows(start: int, end: int, seq_len: int, stride: int, max_windows: Optional[int] = None
            ) -> List[Tuple[int, int, int]]:
    """(first input position, input length, targets to skip at the front) of every window."""
    if seq_len < 1 or stride < 1:
        raise ValueError(f"seq_len and stride must be >= 1, got {seq_len} and {stride}")
    out, scored_to = [], start  # targets at positions <= scored_to are done
    s = start
    while s + 1 < end and (max_windows is None or len(out) < max_windows):
        n = min(seq_len, end - 1 - s)
        skip = max(0, scored_to - s)  # targets s+1 .. s+skip were scored by an earlier window
        if skip < n:
            out.append((s, n, skip))
            scored_to = s + n
        s += stride
    return out


@torch.no_grad()
def evaluate_tokens(model, tokens, start: int, end: int, seq_len: int, stride: Optional[int] = None,
                    batch_size: int = 8, max_windows: Optional[int] = None,
                    bytes_before: Optional[Callable] = None, autocast_bf16: bool = False,
                    vocab_limit: Optional[int] = None) -> dict:
    """Loss (nats / token), perplexity, bits per token and (with `bytes_before`) bits per byte of
    `model` over tokens[start:end] (any 1-D integer array)."""
    stride = stride or seq_len
    plan = windows(start, end, seq_len, stride, max_windows)
    if not plan:
        raise ValueError(f"no window fits: tokens [{start}, {end}) hold fewer than 2 tokens")
    device = next(model.parameters()).device
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast_bf16 else nullcontext()
    nll, count, n_bytes = 0.0, 0, 0.0
    t0 = time.perf_counter()
    i = 0
    while i < len(plan):
        n = plan[i][1]
        batch = [plan[i]]
        while i + len(batch) < len(plan) and len(batch) < batch_size and plan[i + len(batch)][1] == n:
            batch.append(plan[i + len(batch)])
        i += len(batch)
        arr = np.stack([np.asarray(tokens[s:s + n + 1], dtype=np.int64) for s, _, _ in batch])
        ids = torch.from_numpy(arr).to(device)
        with ctx:
            logits = model(ids[:, :-1])
        logits = logits.float()
        if vocab_limit is not None:
            logits = logits[..., :vocab_limit]
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                 reduction="none").view(len(batch), n).double()
        for row, (s, _, skip) in zip(losses, batch):
            nll += float(row[skip:].sum())
            count += n - skip
            if bytes_before is not None:
                b = bytes_before([s + 1 + skip, s + n + 1])
                n_bytes += float(b[1] - b[0])
    loss = nll / count
    out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bits_per_token": loss / math.log(2),
           "scored_tokens": count, "windows": len(plan), "seq_len": seq_len, "stride": stride,
           "tokens": [start, end], "seconds": time.perf_counter() - t0}
    if bytes_before is not None and n_bytes > 0:
        out["bytes"] = n_bytes
        out["bits_per_byte"] = nll / math.log(2) / n_bytes
    return out


def open_stream(data: str, tokenizer_spec: str, workdir: str, doc_sep: str = "blank_line", text_key: str = "text"):
    """An IndexedDataset for `data`: 'builtin' (the built-in corpus), an indexed dataset PREFIX, or a
    text / JSONL file (tokenized into `workdir` as training would: documents joined by end-of-document)."""
    import os

    from megams.data.indexed import IndexedDataset, check_tokenizer, exists
    from megams.data.preprocess import preprocess
    from megams.data.tokenizers import load_tokenizer
    tokenizer = load_tokenizer(tokenizer_spec)
    for suffix in ("", ".bin", ".idx"):
        prefix = data[:len(data) - len(suffix)] if suffix and data.endswith(suffix) else data
        if data != "builtin" and exists(prefix):
            ds = IndexedDataset(prefix)
            check_tokenizer(ds, tokenizer)
            return ds
    prefix = os.path.join(workdir, "eval")
    return preprocess(None if data == "builtin" else [data], prefix, tokenizer_spec, workers=1, doc_sep=doc_sep,
                      text_key=text_key, progress=False)

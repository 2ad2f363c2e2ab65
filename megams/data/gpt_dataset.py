"""Fixed-length training samples over the token stream of an indexed dataset.

The stream is every document's tokens in order; with `append_eod` each document already ends with the
end-of-document token, so documents are joined by eod. As in GPT pretraining a sample may span several
documents: attention (and multi-scale pooling) crosses the eod boundaries, and the model learns to
treat eod as a reset.

A split (train / valid / test) is a contiguous range of the stream (`data.split` fractions, train first),
cut into non-overlapping windows of seq_len + 1 tokens: inputs = window[:-1], targets = window[1:].
The first token of each window is never a target (its context is in the window before), which keeps
windows independent; the cost is 1/(seq_len+1) of the stream.

Sample order: sample number g of a run is window `perm_e[g mod n]` of epoch e = g // n, where perm_e is
`np.random.default_rng([seed, e]).permutation(n)`. So every g (any epoch) is defined by (seed, g) alone,
and a run's data position is just a sample count.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from megams.data.errors import DataError
from megams.data.indexed import IndexedDataset

SPLIT_NAMES = ("train", "valid", "test")


class GPTDataset:
    """Windows of seq_len + 1 tokens over tokens [start, end) of `indexed`; `sample(g)` in seeded order
    (or in stream order with shuffle=False, for evaluation)."""

    def __init__(self, indexed: IndexedDataset, seq_len: int, start: int = 0, end: Optional[int] = None,
                 seed: int = 0, shuffle: bool = True, name: str = "train", source: Optional[str] = None):
        if seed < 0:
            raise DataError(f"training.seed={seed}: the data order needs a non-negative seed")
        self.indexed, self.seq_len, self.seed, self.shuffle, self.name = indexed, seq_len, seed, shuffle, name
        self.source = source or indexed.prefix  # for messages: the file the user named
        self.start = start
        self.end = indexed.n_tokens if end is None else end
        self.n_windows = max(0, (self.end - self.start) // (seq_len + 1))
        meta = getattr(indexed, "meta", None)
        vocab = meta.get("vocab_size") if isinstance(meta, dict) else None
        self.vocab_size = vocab if isinstance(vocab, int) else None  # every id read is checked against it
        self._perms: dict = {}

    def __len__(self) -> int:
        return self.n_windows

    def window_start(self, i: int) -> int:
        return self.start + i * (self.seq_len + 1)

    def window(self, i: int) -> np.ndarray:
        s = self.window_start(i)
        w = self.indexed.read_tokens(s, s + self.seq_len + 1).astype(np.int64)
        vocab = self.vocab_size
        if vocab is not None and w.size and (w.max() >= vocab or w.min() < 0):
            # a corrupted .bin: fail naming it, not with an index error deep inside the embedding
            bad = int(np.flatnonzero((w >= vocab) | (w < 0))[0])
            raise DataError(f"{self.indexed.prefix}.bin: token id {int(w[bad])} at token {s + bad} is outside the "
                            f"vocabulary [0, {vocab}) its index records (a corrupted file? expected ids written by "
                            "tools/preprocess_data.py)")
        return w

    def permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            # = rng.permutation(n_windows) (the same order: shuffle draws do not depend on the dtype), in int32
            # where it fits: 4 bytes a window, e.g. 200 MB for 50M windows (100B tokens of seq_len 2048)
            perm = np.arange(self.n_windows, dtype=np.int32 if self.n_windows < 1 << 31 else np.int64)
            np.random.default_rng([self.seed, epoch]).shuffle(perm)
            self._perms = {epoch: perm, **{e: p for e, p in self._perms.items() if e == epoch - 1}}
        return perm

    def window_index(self, g: int) -> int:
        """Which window sample g of the run is."""
        if self.n_windows == 0:
            raise IndexError(f"{self.source}: the {self.name} split has no windows")
        epoch, k = divmod(int(g), self.n_windows)
        return int(self.permutation(epoch)[k]) if self.shuffle else k

    def sample(self, g: int) -> np.ndarray:
        return self.window(self.window_index(g))

    def target_bytes(self, g: int) -> Optional[float]:
        """Source bytes that sample g's targets (window[1:]) stand for: for bits per byte. O(1) in the number
        of documents for the megams layout; by decoding the documents the window touches for a Megatron
        one (megams.data.megatron); None where the bytes cannot be known."""
        if getattr(self.indexed, "format", "megams") == "megatron" and self.indexed.tokenizer is None:
            return None
        s = self.window_start(self.window_index(g))
        before = self.indexed.source_bytes_before([s + 1, s + self.seq_len + 1])
        return float(before[1] - before[0])

    def __repr__(self) -> str:
        return (f"GPTDataset({self.name}: {self.n_windows} windows of {self.seq_len}+1 tokens, "
                f"tokens [{self.start}, {self.end}) of {self.indexed.prefix})")


def split_bounds(n_tokens: int, split: Sequence[float]) -> List[Tuple[int, int]]:
    """Token ranges of train, valid, test: contiguous, in that order, sized by the normalized fractions."""
    total = float(sum(split))
    cum = np.cumsum([0.0] + [f / total for f in split])
    edges = [int(round(c * n_tokens)) for c in cum]
    edges[-1] = n_tokens
    return [(edges[i], edges[i + 1]) for i in range(3)]


def build_splits(indexed: IndexedDataset, seq_len: int, split: Sequence[float], seed: int,
                 source: str) -> List[Optional[GPTDataset]]:
    """[train, valid, test] GPTDatasets (None for a split with fraction 0). Train is shuffled, the others
    are read in order. Every split with a fraction > 0 must hold at least one window: DataError otherwise."""
    parts: List[Optional[GPTDataset]] = []
    for name, fraction, (a, b) in zip(SPLIT_NAMES, split, split_bounds(indexed.n_tokens, split)):
        if fraction <= 0:
            parts.append(None)
            continue
        ds = GPTDataset(indexed, seq_len, a, b, seed, shuffle=(name == "train"), name=name, source=source)
        require_windows(ds, f"the {name} split ({fraction / sum(split):.0%})")
        parts.append(ds)
    return parts


def require_windows(ds: GPTDataset, what: str) -> None:
    if len(ds) == 0:
        raise DataError(
            f"{ds.source}: dataset too small: {ds.indexed.n_tokens} tokens, {what} has {ds.end - ds.start}, fewer "
            f"than one window of data.seq_len+1 = {ds.seq_len + 1} tokens (use more text, a smaller data.seq_len "
            "or another data.split)")

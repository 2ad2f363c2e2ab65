"""Deterministic weighted blending of several datasets (Megatron's BlendedDataset rule).

Global sample g goes to the dataset whose realised share lags its weight most: the i maximising
w_i * (g + 1) - n_i(g), where n_i(g) counts the samples dataset i received before g (ties: lowest i).
It then gets that dataset's own sample n_i(g), in the dataset's own seeded order. No randomness: the
blend's position is the global sample index alone, and every prefix of the stream is within one sample
of the weights for each dataset.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

from megams.data.errors import DataError

_BLOCK = 1024


class BlendedDataset:
    def __init__(self, datasets: Sequence, weights: Sequence[float], name: str = "train"):
        if not datasets or len(datasets) != len(weights) or len(datasets) > 255:
            raise DataError(f"data.blend: need 1 to 255 datasets with one weight each, got {len(datasets)} "
                            f"datasets and {len(weights)} weights")
        if any(w <= 0 for w in weights):
            raise DataError(f"data.blend: weights must be > 0, got {list(weights)}")
        seq_lens = {d.seq_len for d in datasets}
        if len(seq_lens) != 1:
            raise DataError(f"data.blend: all datasets need the same seq_len, got {sorted(seq_lens)}")
        self.datasets = list(datasets)
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        self.seq_len = seq_lens.pop()
        self.seed = self.datasets[0].seed
        self.name = name
        self.source = "data.blend"
        # Decided samples: the dataset of each (1 byte each for up to 255 datasets), and every _BLOCK
        # samples the running counts, from which a sample's number inside its dataset follows.
        self._choice = np.zeros(0, dtype=np.min_scalar_type(len(self.datasets)))
        self._block_counts = np.zeros((1, len(self.datasets)), dtype=np.int64)
        self._counts = [0] * len(self.datasets)

    def __len__(self) -> int:
        """One pass over the blend: the components' windows together (for epochs and evaluation)."""
        return sum(len(d) for d in self.datasets)

    def _extend(self, needed: int) -> None:
        """Decide samples up to at least `needed`. Sequential by nature (about a microsecond a sample, once)."""
        done = len(self._choice)
        stop = -(-max(needed, 2 * done, 1 << 14) // _BLOCK) * _BLOCK
        w, counts, k = self.weights, self._counts, len(self.weights)
        choice, block_counts = [], []
        for g in range(done, stop):
            if g % _BLOCK == 0 and g:
                block_counts.append(list(counts))
            best, best_lag = 0, w[0] * (g + 1) - counts[0]
            for i in range(1, k):
                lag = w[i] * (g + 1) - counts[i]
                if lag > best_lag:
                    best, best_lag = i, lag
            choice.append(best)
            counts[best] += 1
        self._choice = np.concatenate([self._choice, np.asarray(choice, dtype=self._choice.dtype)])
        if block_counts:
            self._block_counts = np.concatenate([self._block_counts, np.asarray(block_counts, dtype=np.int64)])

    def locate(self, g: int) -> Tuple[int, int]:
        """(dataset index, sample number inside it) of global sample g."""
        g = int(g)
        if g >= len(self._choice):
            self._extend(g + 1)
        i = int(self._choice[g])
        b = g // _BLOCK
        return i, int(self._block_counts[b, i]) + int(np.count_nonzero(self._choice[b * _BLOCK:g] == i))

    def sample(self, g: int) -> np.ndarray:
        i, k = self.locate(g)
        return self.datasets[i].sample(k)

    def target_bytes(self, g: int):
        i, k = self.locate(g)
        return self.datasets[i].target_bytes(k)

    def __repr__(self) -> str:
        parts = ", ".join(f"{w:.3f} x {d!r}" for w, d in zip(self.weights, self.datasets))
        return f"BlendedDataset({self.name}: {parts})"

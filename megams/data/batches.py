"""Global batches that do not depend on the parallel layout.

Optimizer step t uses global samples [t*G, (t+1)*G) of the dataset's sample order (G = global batch),
whatever the data / tensor / pipeline sizes. Those G samples are cut into grad-accumulation micro-steps
of micro_batch x dp_size samples; in each, data rank r takes the contiguous slice
[r*micro_batch, (r+1)*micro_batch). Tensor and pipeline ranks of one data rank get the same batches.

The data position is a sample count (`consumed_samples`): `state_dict()` / `load_state_dict()` restore it
exactly, and it stays meaningful if the global batch size changes between runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch

from megams.data.errors import DataError

Batch = Tuple[torch.Tensor, torch.Tensor]  # inputs LongTensor[m, T], targets LongTensor[m, T]


def _to_batch(windows: List[np.ndarray]) -> Batch:
    arr = torch.from_numpy(np.stack(windows).astype(np.int64, copy=False))
    return arr[:, :-1].contiguous(), arr[:, 1:].contiguous()


class GlobalBatches:
    def __init__(self, dataset, seq_len: int, global_batch: int, micro_batch: int, dp_rank: int = 0,
                 dp_size: int = 1):
        if dataset.seq_len != seq_len:
            raise DataError(f"data.seq_len={seq_len}, but the dataset was cut into windows of {dataset.seq_len}+1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
        if global_batch % (micro_batch * dp_size):
            raise DataError(f"training.global_batch_size={global_batch} is not divisible by "
                            f"training.micro_batch_size={micro_batch} x data-parallel size {dp_size} = "
                            f"{micro_batch * dp_size}")
        self.dataset, self.seq_len = dataset, seq_len
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.accum_steps = global_batch // (micro_batch * dp_size)
        self.consumed_samples = 0

    def sample_ids(self, first_sample: int) -> List[List[int]]:
        """This rank's global sample numbers, per micro-step, for the global batch starting at `first_sample`."""
        m, per_step = self.micro_batch, self.micro_batch * self.dp_size
        return [[first_sample + a * per_step + self.dp_rank * m + j for j in range(m)]
                for a in range(self.accum_steps)]

    def micro_batches(self, step: int) -> List[Batch]:
        """The micro-batches of this rank for optimizer step `step` (0-based): samples [step*G, (step+1)*G)."""
        return self._batches(step * self.global_batch)

    def _batches(self, first_sample: int) -> List[Batch]:
        return [_to_batch([self.dataset.sample(g) for g in ids]) for ids in self.sample_ids(first_sample)]

    def next(self) -> List[Batch]:
        """The micro-batches at the current position, then advance it by one global batch."""
        batches = self._batches(self.consumed_samples)
        self.consumed_samples += self.global_batch
        return batches

    def __iter__(self) -> Iterator[List[Batch]]:
        while True:
            yield self.next()

    @property
    def step(self) -> int:
        return self.consumed_samples // self.global_batch

    @property
    def epoch(self) -> float:
        """Passes over the training windows so far."""
        return self.consumed_samples / max(1, len(self.dataset))

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "global_batch": self.global_batch,
                "seq_len": self.seq_len, "seed": self.dataset.seed, "samples_per_epoch": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the saved run stopped. The sample order must be the same one: a checkpoint
        from another seed, seq_len or dataset would silently continue a different order, so that fails."""
        now = {"seed": self.dataset.seed, "seq_len": self.seq_len, "samples_per_epoch": len(self.dataset)}
        for key, value in now.items():
            if key in state and state[key] != value:
                raise DataError(f"data state in the checkpoint has {key}={state[key]}, this run has {key}={value}: "
                                "resuming would not continue the same sample order")
        self.consumed_samples = int(state["consumed_samples"])


@dataclass
class EvalBatches:
    """This rank's evaluation batches, plus what the whole evaluation covers (the same on every rank)."""

    batches: List[Batch] = field(default_factory=list)
    n_tokens: int = 0             # target tokens over all ranks
    # source bytes per target token over all ranks: bits/byte = loss/ln2/this; None when the source bytes are
    # unknown (never a guess). Megatron datasets: the bytes of the decoded documents (megams.data.megatron).
    bytes_per_token: Optional[float] = 1.0

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def eval_batches(dataset, n_batches: int, batch_size: int, dp_rank: int = 0, dp_size: int = 1) -> EvalBatches:
    """The first n_batches x batch_size windows of an evaluation split, in order (no shuffle): global eval
    batch b is windows [b*batch_size, (b+1)*batch_size), and data rank r takes its contiguous slice of
    batch_size / dp_size. Fewer batches if the split is shorter; the set evaluated never depends on dp_size."""
    if batch_size % dp_size:
        raise DataError(f"eval batch size {batch_size} is not divisible by the data-parallel size {dp_size}")
    n = min(n_batches, len(dataset) // batch_size)
    if n == 0:
        raise DataError(f"{dataset.source}: the {dataset.name} split has {len(dataset)} windows of "
                        f"{dataset.seq_len}+1 tokens, fewer than one eval batch of {batch_size}")
    per_rank = batch_size // dp_size
    batches = []
    for b in range(n):
        first = b * batch_size + dp_rank * per_rank
        batches.append(_to_batch([dataset.sample(g) for g in range(first, first + per_rank)]))
    n_tokens = n * batch_size * dataset.seq_len
    per_window = [dataset.target_bytes(g) for g in range(n * batch_size)]
    if any(b is None for b in per_window):
        return EvalBatches(batches, n_tokens, None)
    total_bytes = math.fsum(per_window)
    return EvalBatches(batches, n_tokens, total_bytes / n_tokens if total_bytes > 0 else None)

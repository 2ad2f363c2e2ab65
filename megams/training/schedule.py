"""Learning-rate schedule: linear warmup, then cosine decay to min_lr_ratio * lr."""
from __future__ import annotations

import math


def lr_multiplier(step: int, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based: the step about to be taken)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, max_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

"""Random streams for dropout under tensor parallelism (after Megatron's RNG tracker).

Two streams per rank, both seeded from (seed, dp rank, pp rank):
- the default generator (torch.manual_seed): the SAME on every tensor rank of a replica, so
  dropout on replicated activations (residual stream, embeddings) draws identical masks and the
  replicas stay identical; different across data-parallel ranks (different data, independent masks)
  and pipeline stages (different layers);
- the "model-parallel" stream of the tracker: additionally DIFFERENT on every tensor rank, for
  dropout on activations split over the tensor ranks (attention probabilities of this rank's
  heads; with sequence parallelism, this rank's part of the sequence). Identical masks there
  would correlate head h with head h + H/tp, which the single-process model never does.

    seed_parallel_rng(cfg.training.seed, dims)
    with get_rng_tracker().fork():      # inside: draws come from the model-parallel stream
        probs = F.dropout(probs, p)

Forking saves the default state, runs on the tracker's, stores the advanced tracker state and
restores the default one, so the default stream is untouched. CPU and, whenever CUDA is available,
the current CUDA device's generator are both switched, whatever the order of `seed_parallel_rng`,
CUDA's initialisation and `torch.cuda.set_device`: a stream's states are made from its seed on
private generators (the default ones are never reseeded), the CUDA state of a device the first
time the stream is forked on it. Activation recomputation must restore the tracker states too:
`get_states()` / `set_states()`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, Optional

import torch

MODEL_PARALLEL_RNG = "model-parallel"

# Seed offsets (Megatron's 2718 for the model-parallel stream). Distinct ranks get distinct seeds
# while tp < 100 and pp < 10_000.
_MP_OFFSET, _PP_STRIDE, _DP_STRIDE = 2718, 100, 1_000_003


def _cuda_key() -> Optional[str]:
    """"cuda:<current device>" when CUDA is available (initialised or not), else None."""
    if not torch.cuda.is_available():
        return None
    return f"cuda:{torch.cuda.current_device()}"


def _capture(cuda_key: Optional[str]) -> Dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if cuda_key is not None:
        state[cuda_key] = torch.cuda.get_rng_state(cuda_key)
    return state


def _restore(state: Dict[str, torch.Tensor]) -> None:
    for key, value in state.items():
        if key == "cpu":
            torch.set_rng_state(value)
        else:
            torch.cuda.set_rng_state(value, key)


def _seeded_state(seed: int, device: str) -> torch.Tensor:
    """The state of a fresh generator on `device` seeded with `seed` (the default one untouched)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g.get_state()


class RNGStatesTracker:
    """Named generator states that `fork(name)` swaps in for the duration of a block."""

    def __init__(self):
        self._states: Dict[str, Dict[str, torch.Tensor]] = {}
        self._seeds: Dict[str, int] = {}

    def reset(self) -> None:
        self._states, self._seeds = {}, {}

    def add(self, name: str, seed: int) -> None:
        if name in self._states:
            raise ValueError(f"RNG state {name!r} already exists")
        self._seeds[name] = seed
        self._states[name] = {"cpu": _seeded_state(seed, "cpu")}  # CUDA states: on first fork per device

    def get_states(self) -> Dict[str, Dict[str, torch.Tensor]]:
        return {name: {k: v.clone() for k, v in s.items()} for name, s in self._states.items()}

    def set_states(self, states: Dict[str, Dict[str, torch.Tensor]]) -> None:
        self._states = {name: {k: v.clone() for k, v in s.items()} for name, s in states.items()}

    @contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        if name not in self._states:
            raise KeyError(f"RNG state {name!r} was never added (call seed_parallel_rng first)")
        key = _cuda_key()
        mine = self._states[name]
        if key is not None and key not in mine:
            mine[key] = _seeded_state(self._seeds.get(name, 0), key)
        saved = _capture(key)
        _restore({k: v for k, v in mine.items() if k in ("cpu", key)})
        try:
            yield
        finally:
            mine.update(_capture(key))
            self._states[name] = mine
            _restore(saved)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _TRACKER


def parallel_seeds(seed: int, dp_rank: int, pp_rank: int, tp_rank: int) -> tuple[int, int]:
    """(default seed, model-parallel seed) of a rank; the default one is `seed` on rank 0."""
    default = seed + _DP_STRIDE * dp_rank + _PP_STRIDE * pp_rank
    return default, default + _MP_OFFSET + tp_rank


def seed_parallel_rng(seed: int, dims) -> None:
    """Seed the default generator and (re)create the tracker's model-parallel stream for `dims`."""
    default, model_parallel = parallel_seeds(seed, dims.dp_rank, dims.pp_rank, dims.tp_rank)
    torch.manual_seed(default)
    _TRACKER.reset()
    _TRACKER.add(MODEL_PARALLEL_RNG, model_parallel)

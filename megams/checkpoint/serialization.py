"""Loading checkpoint files without unpickling arbitrary objects, and without importing deepspeed.

DeepSpeed's optimizer files pickle a few of its own classes (`ZeroStageEnum`, `LossScaler`,
`fragment_address`) next to the tensors. `load_shard` reads them with `torch.load(weights_only=True)`,
standing in an inert record (`DeepSpeedObject`) for each of those (`manifest.ALLOWED_GLOBALS`); any
other non-tensor global is refused. So reading a training checkpoint runs no code from the file and
works where deepspeed is not installed.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any

import torch

from megams.checkpoint.errors import CheckpointError


class DeepSpeedObject:
    """Stand-in for a DeepSpeed class inside a checkpoint: keeps constructor args and pickled state."""

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"DeepSpeedObject(args={self.args!r}, state={self.state!r})"


def _stand_ins(path: str) -> list:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (RuntimeError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise truncated(path, e) from None
    from megams.checkpoint.manifest import ALLOWED_GLOBALS
    foreign = [n for n in names if n not in ALLOWED_GLOBALS]
    if foreign:
        raise CheckpointError(f"{path}: refusing to load: the file pickles objects other than tensors and "
                              f"the DeepSpeed records megams allows ({', '.join(sorted(foreign))})")
    return [(DeepSpeedObject, n) for n in names]


def truncated(path: str, err: BaseException) -> CheckpointError:
    text = str(err).strip()
    if isinstance(err, (zipfile.BadZipFile, EOFError)) or "zip archive" in text or \
            "returned by torch.save" in text:
        detail = "not a complete torch zip archive"  # a cut-off file: its zip directory is missing
    else:
        detail = text.splitlines()[0] if text else type(err).__name__
    return CheckpointError(f"{path}: truncated or corrupted checkpoint shard ({detail})")


def load_shard(path: str) -> Any:
    """torch.load(path) with weights_only=True (+ inert stand-ins for DeepSpeed's records), on CPU."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    stand_ins = _stand_ins(path)
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, OSError) as e:
        raise truncated(path, e) from None

"""What a checkpoint holds, recorded when it is written and checked before anything is loaded.

`megams.json` (written last: its presence is what makes a checkpoint complete) carries

    "format": "megams-checkpoint/2",
    "code_version": {"megams": "0.1.0", "git": "<commit>" | null, "torch": ..., "deepspeed": ...},
    "manifest": {"version": 1, "files": {"mp_rank_00_model_states.pt": {"bytes": N, "sha256": "..."}, ...}}

`hash_files` reads each file back from disk (after fsync), so the sizes and digests describe what is
really there. `verify` checks a directory against its manifest: no file missing, none added (a file
dropped into a checkpoint directory later is refused), every size, and every sha256 unless
`checksums=False`; and every `.pt` file must pickle only tensors, containers and the few DeepSpeed
records on `ALLOWED_GLOBALS` (scanned without unpickling), because DeepSpeed's own loader unpickles
with `weights_only=False`. The work splits over ranks: rank r checks files r, r + world, ...
"""
from __future__ import annotations

import functools
import hashlib
import os
import pickle
import zipfile
from typing import Dict, Iterable, List, Optional

from megams.checkpoint.errors import CheckpointError

MANIFEST_VERSION = 1
META_FILE = "megams.json"
CHUNK = 8 << 20

# Everything a DeepSpeed checkpoint pickles besides tensors and plain containers (ZeRO 0-3, bf16/fp16,
# pipeline; DeepSpeed 0.16-0.18). Anything else in a `.pt` file is refused before DeepSpeed sees it.
ALLOWED_GLOBALS = frozenset({
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
})
# megams-checkpoint/1 pickled numpy's RNG state (an ndarray) in rng/rank_*.pt. megams itself loads those
# files (torch.load(weights_only=True) allowing exactly these), DeepSpeed never does: allowed there only.
NUMPY_ARRAY_GLOBALS = frozenset({
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype",
    "numpy.dtypes.UInt32DType",
})


def list_files(ckpt: str) -> List[str]:
    """Every regular file below `ckpt` (relative, sorted), the meta file excepted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(ckpt):
        dirnames.sort()
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), ckpt)
            if rel != META_FILE:
                out.append(rel)
    return sorted(out)


def sha256_file(path: str, fsync: bool = False) -> Dict[str, object]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        if fsync:
            os.fsync(f.fileno())
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                break
            size += len(chunk)
            h.update(chunk)
    return {"bytes": size, "sha256": h.hexdigest()}


def hash_files(ckpt: str, names: Iterable[str], fsync: bool = True) -> Dict[str, dict]:
    return {n: sha256_file(os.path.join(ckpt, n), fsync=fsync) for n in names}


def share(names: List[str], rank: int, world: int) -> List[str]:
    """This rank's part of a file list (round robin)."""
    return names[rank::world]


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    import subprocess

    import megams
    out = {"megams": megams.__version__, "git": None}
    root = os.path.dirname(os.path.dirname(os.path.abspath(megams.__file__)))
    try:
        p = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if p.returncode == 0:
            out["git"] = p.stdout.strip()
            dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5)
            out["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    for mod in ("torch", "deepspeed"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out


def unsafe_globals(path: str, extra: frozenset = frozenset()) -> List[str]:
    """Globals a torch zip file's pickle names that are not on the allowlist (+ `extra`; no unpickling)."""
    import torch
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (RuntimeError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, OSError) as e:
        from megams.checkpoint.serialization import truncated
        raise truncated(path, e) from None
    return [n for n in names if n not in ALLOWED_GLOBALS and n not in extra]


def check_pickle(path: str, extra: frozenset = frozenset()) -> None:
    bad = unsafe_globals(path, extra)
    if bad:
        raise CheckpointError(f"{path}: refusing to load: the file pickles objects other than tensors and the "
                              f"DeepSpeed records megams allows ({', '.join(sorted(bad))})")


def check_files(ckpt: str, manifest: Optional[dict], names: List[str], checksums: bool = True) -> None:
    """Check `names` (relative to `ckpt`) against `manifest` (None: an old checkpoint without one,
    then only the pickle scan runs). Raises CheckpointError naming the first bad file."""
    files = (manifest or {}).get("files")
    for name in names:
        path = os.path.join(ckpt, name)
        if files is not None:
            want = files.get(name)
            if want is None:
                raise CheckpointError(f"{path}: not in the checkpoint's manifest (added after the checkpoint was "
                                      f"written?): refusing to load the checkpoint")
            try:
                size = os.path.getsize(path)
            except OSError:
                raise CheckpointError(f"{path}: missing (the manifest lists it, {want['bytes']} bytes)") from None
            if size != want["bytes"]:
                raise CheckpointError(f"{path}: truncated or corrupted checkpoint shard ({size} bytes, the "
                                      f"manifest says {want['bytes']})")
            if checksums and sha256_file(path)["sha256"] != want["sha256"]:
                raise CheckpointError(f"{path}: corrupted checkpoint shard (sha256 differs from the manifest)")
        if name.endswith(".pt"):
            check_pickle(path, NUMPY_ARRAY_GLOBALS if name.startswith("rng" + os.sep) else frozenset())


def expected_names(ckpt: str, meta: dict) -> List[str]:
    """What must be checked: the manifest's files plus anything else present (an extra file is refused)."""
    present = list_files(ckpt)
    files = (meta.get("manifest") or {}).get("files")
    if files is None:
        return present
    return sorted(set(present) | set(files))


def verify(ckpt: str, meta: dict, rank: int = 0, world: int = 1, checksums: bool = True) -> None:
    """This rank's share of the checks of `verify_all` (no collective here)."""
    names = expected_names(ckpt, meta)
    check_files(ckpt, meta.get("manifest"), share(names, rank, world), checksums)

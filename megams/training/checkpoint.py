"""Run-directory layout, atomic checkpoints and exact resume.

    RUN_DIR/
      config.yaml            the resolved config of the first start
      metrics.jsonl          one JSON object per logged step / evaluation (rank 0)
      tensorboard/           when logging.tensorboard
      checkpoints/
        latest               name of the newest complete checkpoint (replaced atomically)
        step_00000100/       DeepSpeed's files of every rank + rng/rank_XXXXX.pt + megams.json (last)
        nonfinite_step_00000123/   the last good state, saved when a run stops on a NaN/inf

Saving (collective, `save`):
 1. rank 0 removes leftovers of interrupted saves (`*.tmp`); every rank checks the free space it
    will need (the previous checkpoint's size, or an estimate) — a shortfall fails before anything
    is written;
 2. every rank writes its DeepSpeed files and RNG state into `step_N.tmp/` (DeepSpeed's own
    `latest` is off); a failing write (disk full, I/O error) is caught, agreed on by all ranks,
    the temporary directory is removed and `CheckpointSaveError` is raised everywhere;
 3. every rank reads back (fsync + sha256) its share of the files; rank 0 writes `megams.json`
    with the manifest (sizes + sha256), format and code version, renames `step_N.tmp` -> `step_N`,
    replaces `latest` (write tmp + fsync + rename + directory fsync) and rotates old checkpoints.
A crash at any point leaves the previous `latest` and its checkpoint untouched. Rotation keeps the
`keep_last` newest complete checkpoints and never the one `latest` names.

Loading (collective, `load`): every rank checks its share of the files against the manifest (and
that every `.pt` pickles only allowed types), the ranks agree, and only then does DeepSpeed (which
unpickles with weights_only=False) open anything.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist

from megams.checkpoint import manifest as mf
from megams.checkpoint.errors import CheckpointError
from megams.checkpoint.reader import FORMAT, META_FILE, read_meta

CKPT_SUBDIR = "checkpoints"
TMP_SUFFIX = ".tmp"
_UNREADABLE = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError)


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (the previous one is intact). Exit code 3."""


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, CKPT_SUBDIR)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """Path of the newest complete checkpoint of a run directory, or None."""
    root = checkpoint_root(run_dir)
    pointer = os.path.join(root, "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        tag = f.read().strip()
    path = os.path.join(root, tag)
    if not os.path.exists(os.path.join(path, META_FILE)):
        raise CheckpointError(f"{pointer}: names {tag!r}, which is not a complete checkpoint (no {META_FILE}); "
                              f"point it at a complete step_* directory or remove it to start afresh")
    return path


# --- durable small writes ---------------------------------------------------------------------
def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


# --- RNG state: plain tensors and ints, loadable with weights_only=True -------------------------
def rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    if isinstance(n, dict):
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    else:  # megams-checkpoint/1 stored numpy's own tuple
        np.random.set_state(n)
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --- collectives over all ranks -----------------------------------------------------------------
def _world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(obj) -> list:
    rank, world = _world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _first_error(errors: list) -> Optional[str]:
    return next((e for e in errors if e), None)


def _barrier() -> None:
    if _world()[1] > 1:
        dist.barrier()


# --- saving -------------------------------------------------------------------------------------
def complete_checkpoints(root: str) -> List[str]:
    """Complete `step_*` checkpoints under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    out = [os.path.join(root, n) for n in os.listdir(root) if n.startswith("step_") and TMP_SUFFIX not in n]
    return sorted(p for p in out if os.path.isfile(os.path.join(p, META_FILE)))


def checkpoint_bytes(ckpt: str) -> int:
    try:
        files = read_meta(ckpt).get("manifest", {}).get("files", {})
        if files:
            return sum(int(f["bytes"]) for f in files.values())
    except CheckpointError:
        pass
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ckpt) for f in fs)


def _needed_bytes(root: str, estimate: int) -> int:
    done = complete_checkpoints(root)
    size = checkpoint_bytes(done[-1]) if done else estimate
    return int(size * 1.05) + (1 << 20)


def _space_error(root: str, need: int) -> Optional[str]:
    try:
        free = shutil.disk_usage(root).free
    except OSError as e:
        return f"{root}: cannot check free space ({e.strerror})"
    if free < need:
        return (f"{root}: not enough free space for a checkpoint: about {need / 2**20:.1f} MiB needed, "
                f"{free / 2**20:.1f} MiB free (nothing was written; the previous checkpoint is intact)")
    return None


def _write_error(root: str, err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, OSError) and err.errno == errno.ENOSPC or "No space left" in text or \
            "file write failed" in text:
        return f"{root}: no space left on device while writing a checkpoint ({text})"
    return f"{root}: writing the checkpoint failed ({type(err).__name__}: {text})"


def save(engine, run_dir: str, step: int, meta: dict, keep_last: int, tag: Optional[str] = None,
         make_latest: bool = True, size_estimate: int = 0) -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory; raises
    CheckpointSaveError (on every rank) when it could not be written."""
    rank, world = _world()
    root = checkpoint_root(run_dir)
    tag = tag or tag_for(step)
    tmp_tag = tag + TMP_SUFFIX
    tmp, final = os.path.join(root, tmp_tag), os.path.join(root, tag)

    # 1. leftovers of interrupted saves; free space, agreed before anything is written
    err = None
    if rank == 0:
        try:
            os.makedirs(root, exist_ok=True)
            for name in os.listdir(root):
                if name.endswith(TMP_SUFFIX):
                    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        except OSError as e:
            err = _write_error(root, e)
    _barrier()
    err = err or (_space_error(root, _needed_bytes(root, size_estimate)) if os.path.isdir(root) else
                  f"{root}: checkpoint directory missing")
    err = _first_error(_gather(err))
    if err:
        raise CheckpointSaveError(err)

    # 2. every rank's files
    err = None
    try:
        engine.save_checkpoint(root, tag=tmp_tag, save_latest=False)
    except Exception as e:  # noqa: BLE001 - any failed write: agree, clean up, report
        from megams.distributed.watchdog import is_comm_failure
        if is_comm_failure(e):
            raise
        err = _write_error(root, e)
        _barrier()  # the barrier that ends DeepSpeed's save_checkpoint, which this rank did not reach
    if err is None:
        try:
            os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
            torch.save(rng_state(), os.path.join(tmp, "rng", f"rank_{rank:05d}.pt"))
        except Exception as e:  # noqa: BLE001
            err = _write_error(root, e)
    err = _first_error(_gather(err))
    if err:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        raise CheckpointSaveError(err)

    # 3. read back and hash (each rank its share), then rank 0 commits
    names = mf.list_files(tmp)
    try:
        mine, err = mf.hash_files(tmp, mf.share(names, rank, world)), None
    except OSError as e:
        mine, err = {}, _write_error(root, e)
    gathered = _gather((mine, err))
    err = _first_error([e for _, e in gathered])
    if err is None and rank == 0:
        files = {}
        for part, _ in gathered:
            files.update(part)
        meta = {**meta, "format": FORMAT, "code_version": mf.code_version(),
                "manifest": {"version": mf.MANIFEST_VERSION, "files": dict(sorted(files.items()))}}
        try:
            atomic_write(os.path.join(tmp, META_FILE), json.dumps(meta, indent=1))
            if os.path.exists(final):  # the same step saved again (e.g. a rerun): replace it
                old = final + ".old" + TMP_SUFFIX
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
            fsync_dir(root)
            if make_latest:
                atomic_write(os.path.join(root, "latest"), tag)
                rotate(root, keep_last)
        except OSError as e:
            err = _write_error(root, e)
            shutil.rmtree(tmp, ignore_errors=True)
    err = _first_error(_gather(err))
    if err:
        raise CheckpointSaveError(err)
    return final


def rotate(root: str, keep_last: int) -> List[str]:
    """Delete complete checkpoints beyond the `keep_last` newest; never the one `latest` names."""
    keep_last = max(1, keep_last)
    latest = None
    pointer = os.path.join(root, "latest")
    if os.path.isfile(pointer):
        with open(pointer) as f:
            latest = os.path.join(root, f.read().strip())
    done = complete_checkpoints(root)
    removed = []
    for old in done[:-keep_last]:
        if old != latest:
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
    return removed


# --- loading ------------------------------------------------------------------------------------
def verify(ckpt_dir: str, checksums: bool = True) -> dict:
    """Collective: every rank checks its share of the files; all raise the first problem found."""
    rank, world = _world()
    err, meta = None, None
    try:
        meta = read_meta(ckpt_dir)
        mf.verify(ckpt_dir, meta, rank, world, checksums)
    except CheckpointError as e:
        err = str(e)
    err = _first_error(_gather(err))
    if err:
        raise CheckpointError(err)
    return meta


def load(engine, ckpt_dir: str, load_optimizer: bool = True, checksums: bool = True) -> dict:
    """Collective: verifies the files, then restores module, optimizer, scheduler (DeepSpeed) and
    this rank's RNG."""
    meta = verify(ckpt_dir, checksums)
    root, tag = os.path.split(ckpt_dir.rstrip("/"))
    path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=load_optimizer,
                                     load_lr_scheduler_states=load_optimizer)
    if path is None:
        raise CheckpointError(f"{ckpt_dir}: DeepSpeed found no checkpoint files for this layout")
    rng_file = os.path.join(ckpt_dir, "rng", f"rank_{_world()[0]:05d}.pt")
    if os.path.exists(rng_file):
        set_rng_state(_load_rng(rng_file))
    return meta


def _load_rng(path: str) -> dict:
    try:
        return torch.load(path, weights_only=True)
    except _UNREADABLE as e:
        # megams-checkpoint/1 pickled numpy's RNG tuple: allow exactly numpy's array reconstruction
        core = getattr(np, "_core", None) or np.core
        allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, weights_only=True)
        except _UNREADABLE:
            raise CheckpointError(f"{path}: unreadable RNG state ({e})") from None

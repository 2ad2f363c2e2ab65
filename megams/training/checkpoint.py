"""Run-directory layout, atomic checkpoints and exact resume.

    RUN_DIR/
      config.yaml            the resolved config of the first start
      metrics.jsonl          one JSON object per logged step / evaluation (rank 0)
      tensorboard/           when logging.tensorboard
      checkpoints/
        latest               name of the newest complete checkpoint (replaced atomically)
        step_00000100/       DeepSpeed's files for every rank + megams.json + rng/rank_XXXXX.pt

A checkpoint is written into `step_N.tmp-XXXX/` by every rank, then (after a barrier) rank 0
renames it to `step_N/` and rewrites `latest`: a run killed mid-save leaves the previous
checkpoint intact and resumable. Only `keep_last` complete checkpoints are kept.
"""
from __future__ import annotations

import glob
import json
import os
import random
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

CKPT_SUBDIR = "checkpoints"
META_FILE = "megams.json"


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
    return path if os.path.exists(os.path.join(path, META_FILE)) else None


def read_meta(ckpt_dir: str) -> dict:
    with open(os.path.join(ckpt_dir, META_FILE)) as f:
        return json.load(f)


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, run_dir: str, step: int, meta: dict, keep_last: int) -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    rank = dist.get_rank()
    root = checkpoint_root(run_dir)
    tag = tag_for(step)
    tmp_tag = f"{tag}.tmp"
    final = os.path.join(root, tag)
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(os.path.join(root, tmp_tag), ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(root, tag=tmp_tag, save_latest=False)
    os.makedirs(os.path.join(root, tmp_tag, "rng"), exist_ok=True)
    torch.save(rng_state(), os.path.join(root, tmp_tag, "rng", f"rank_{rank:05d}.pt"))
    dist.barrier()
    if rank == 0:
        _atomic_write(os.path.join(root, tmp_tag, META_FILE), json.dumps(meta, indent=1))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(os.path.join(root, tmp_tag), final)
        _atomic_write(os.path.join(root, "latest"), tag)
        done = sorted(p for p in glob.glob(os.path.join(root, "step_*")) if not p.endswith(".tmp"))
        for old in done[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load(engine, ckpt_dir: str, load_optimizer: bool = True) -> dict:
    """Collective: restores module, optimizer, scheduler (DeepSpeed) and this rank's RNG."""
    root, tag = os.path.split(ckpt_dir.rstrip("/"))
    path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=load_optimizer,
                                     load_lr_scheduler_states=load_optimizer)
    if path is None:
        raise RuntimeError(f"checkpoint {ckpt_dir}: DeepSpeed could not load it")
    rng_file = os.path.join(ckpt_dir, "rng", f"rank_{dist.get_rank():05d}.pt")
    if os.path.exists(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    return read_meta(ckpt_dir)

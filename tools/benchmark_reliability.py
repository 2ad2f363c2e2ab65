#!/usr/bin/env python
"""What megams' reliability machinery costs, side by side with plain DeepSpeed, in one run:

- save: `engine.save_checkpoint` alone vs megams' atomic save (temporary directory, read-back
  sha256 manifest, fsyncs, rename, `latest`, rotation);
- load: `engine.load_checkpoint` alone vs megams' load (manifest check with sha256, or sizes only,
  plus the pickle scan, then DeepSpeed);
- step: a training step (forward, backward, optimizer) without and with the NaN/inf guard on the
  optimizer (one fused inf-norm over the gradients per step; the all-reduce is a no-op on one rank).

    python tools/benchmark_reliability.py [--d-model 512] [--layers 8] [--zero 0] [--repeats 3]

One process, gloo, world size 1, on CPU (the machine's disk for the checkpoints: --dir). Times are
medians over --repeats. Wrap in `flock /tmp/megams-heavy.lock` on a shared machine.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".venv", "torch_extensions"))


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--zero", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where checkpoints are written (default: a temporary directory)")
    args = p.parse_args(argv)

    import warnings
    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist

    from megams.config import load_config
    from megams.models import build_model
    from megams.training import checkpoint as ckpt
    from megams.training.engine import build_engine
    from megams.training.loss import lm_loss
    from megams.training.nonfinite import NonFiniteGuard

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29577")
    dist.init_process_group("gloo", rank=0, world_size=1)
    cfg = load_config(os.path.join(ROOT, "configs", "tiny", "vanilla.yaml"),
                      [f"model.d_model={args.d_model}", f"model.n_layers={args.layers}", "model.n_heads=8",
                       f"parallel.zero_stage={args.zero}", "training.micro_batch_size=4",
                       "training.global_batch_size=4", "data.seq_len=128"])
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (4, 129))
    x, y = tokens[:, :-1], tokens[:, 1:]

    def engine_for(guard):
        model = build_model(cfg.model, seed=1)
        engine, _, _ = build_engine(cfg, model, 1, "fp32", guard=guard)
        return engine

    def step(engine):
        loss = lm_loss(engine(x), y)
        engine.backward(loss)
        engine.step()

    rows = []
    # -- the training step ---------------------------------------------------------------------
    plain, guarded_guard = engine_for(None), NonFiniteGuard()
    guarded = engine_for(guarded_guard)
    for e in (plain, guarded):
        step(e)  # warm-up
    t_plain = median_time(lambda: step(plain), args.repeats * 3)
    t_guard = median_time(lambda: (step(guarded), guarded_guard.pop(guarded)), args.repeats * 3)
    n_params = sum(q.numel() for q in plain.module.parameters())
    rows.append(("training step", f"{t_plain * 1e3:.1f} ms", f"{t_guard * 1e3:.1f} ms (NaN/inf guard)",
                 f"{(t_guard / t_plain - 1) * 100:+.1f}%"))

    # -- save ----------------------------------------------------------------------------------
    base = args.dir or tempfile.mkdtemp(prefix="megams-bench-rel-")
    raw_root = os.path.join(base, "raw")
    run_dir = os.path.join(base, "run")
    counter = {"n": 0}

    def save_raw():
        counter["n"] += 1
        shutil.rmtree(raw_root, ignore_errors=True)
        plain.save_checkpoint(raw_root, tag=f"s{counter['n']}", save_latest=False)
        os.sync()

    def save_megams():
        counter["n"] += 1
        ckpt.save(plain, run_dir, counter["n"], {"step": counter["n"]}, keep_last=1)
        os.sync()

    t_save_raw = median_time(save_raw, args.repeats)
    t_save = median_time(save_megams, args.repeats)
    latest = ckpt.latest_checkpoint(run_dir)
    size = ckpt.checkpoint_bytes(latest)
    rows.append((f"save ({size / 2**20:.0f} MiB)", f"{t_save_raw:.3f} s", f"{t_save:.3f} s (atomic + sha256 manifest)",
                 f"{(t_save / t_save_raw - 1) * 100:+.1f}%"))

    # -- load ----------------------------------------------------------------------------------
    root, tag = os.path.split(latest)

    def load_raw():
        plain.load_checkpoint(root, tag=tag)

    t_load_raw = median_time(load_raw, args.repeats)
    t_load_sum = median_time(lambda: ckpt.load(plain, latest, checksums=True), args.repeats)
    t_load_size = median_time(lambda: ckpt.load(plain, latest, checksums=False), args.repeats)
    rows.append(("load", f"{t_load_raw:.3f} s", f"{t_load_sum:.3f} s (verify sha256 + pickle scan)",
                 f"{(t_load_sum / t_load_raw - 1) * 100:+.1f}%"))
    rows.append(("load", f"{t_load_raw:.3f} s", f"{t_load_size:.3f} s (verify sizes + pickle scan)",
                 f"{(t_load_size / t_load_raw - 1) * 100:+.1f}%"))
    if not args.dir:
        shutil.rmtree(base, ignore_errors=True)

    print(f"model: vanilla d_model={args.d_model} layers={args.layers} ({n_params / 1e6:.1f}M parameters), "
          f"ZeRO-{args.zero}, fp32, 1 rank, torch threads={torch.get_num_threads()}, repeats={args.repeats}")
    widths = [max(len(r[i]) for r in rows + [("", "plain DeepSpeed", "megams", "overhead")]) for i in range(4)]
    header = ("", "plain DeepSpeed", "megams", "overhead")
    for r in [header] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

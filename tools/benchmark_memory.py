#!/usr/bin/env python
"""Peak memory per rank of one model under activation checkpointing off / selective / full and
ZeRO 0 / 1 / 2 / 3: one table, one run.

    python tools/benchmark_memory.py [--config configs/tiny/bottom_up_30l.yaml] [--set k=v ...]
                                     [--ranks 2] [--steps 3]

Every row trains the same model for a few steps on random tokens, data parallel over --ranks
fresh processes (gloo, 1 thread each). Per rank: the peak resident set size (VmHWM, reset just
before the model is built) and its rise over the resident size at that point (model, gradients,
optimizer states, saved activations, DeepSpeed's buffers): over the whole run (set-up included:
DeepSpeed's ZeRO flattens the parameters into new buffers, a transient second copy), and over
the training steps after the first one (steady state). glibc is told to return large blocks to
the system at once (MALLOC_MMAP_THRESHOLD_), so the resident size follows the live tensors.
On CPU this is the number that decides whether a run fits. Wrap in `flock /tmp/megams-heavy.lock` here.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".venv", "torch_extensions"))

# (label, activation checkpointing overrides, ZeRO stage)
ROWS = [
    ("AC off, ZeRO-0", [], 0),
    ("AC selective (attention), ZeRO-0", ["mode=attention"], 0),
    ("AC selective (every 2nd block), ZeRO-0", ["mode=every_k", "every_k=2"], 0),
    ("AC full, ZeRO-0", ["mode=full"], 0),
    ("AC off, ZeRO-1", [], 1),
    ("AC off, ZeRO-2", [], 2),
    ("AC off, ZeRO-3", [], 3),
    ("AC full, ZeRO-3", ["mode=full"], 3),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny", "bottom_up_30l.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--ranks", type=int, default=2, help="data-parallel ranks")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))  # inherited by the ranks

    from megams.bench import pipeline as bp
    from megams.config import load_config
    from megams.models.cost import param_count

    rows = []
    cfg = None
    for label, ac, zero in ROWS:
        sets = args.set + [f"parallel.zero_stage={zero}"] + [f"parallel.activation_checkpointing.{a}" for a in ac]
        cfg = load_config(args.config, sets)
        ranks = bp.spawn_ranks(args.ranks, bp.memory_worker, (cfg, args.steps))
        rows.append([label] + [f"{bp.fmt_mib(r['peak'])} (+{bp.fmt_mib(r['peak'] - r['baseline'])}, "
                               f"+{bp.fmt_mib(r['peak_steady'] - r['baseline'])})" for r in ranks]
                    + [f"{max(r['step_s'] for r in ranks):.2f}"])
        print(f"  done: {label}", file=sys.stderr, flush=True)
    t = cfg.training
    header = (["setting"] + [f"rank {r}: peak RSS MiB (+rise: whole run, steady steps)" for r in range(args.ranks)]
              + ["s/step"])
    print(f"megams memory, {datetime.date.today()}, {bp.machine_line()}, {args.ranks} data-parallel ranks, 1 thread each\n"
          f"model: {os.path.relpath(args.config, ROOT)} {' '.join(args.set)} ({cfg.model.type}, "
          f"{param_count(cfg.model) / 1e6:.2f}M params, d={cfg.model.d_model}), micro-batch {t.micro_batch_size} x "
          f"seq {cfg.data.seq_len}, {cfg.grad_accum_steps(args.ranks)} micro-batches per step, {t.precision}, "
          f"AdamW, {args.steps} steps\n\n" + bp.markdown_table(header, rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Pipeline parallelism measured: per-stage compute balance of partitions, and the pipeline bubble.

    python tools/benchmark_pipeline.py balance [--config configs/tiny/bottom_up_30l.yaml] [--set k=v ...]
                                               [--steps 4] [--micro-batches 8]
    python tools/benchmark_pipeline.py bubble  [--config ...] [--stages 2] [--micro-batches 1 4 8] [--steps 4]
    python tools/benchmark_pipeline.py calibrate [--config ...]

calibrate: every pipeline unit timed alone (forward + backward, one micro-batch, one thread),
and the fit time = (FLOPs + overhead_rows x FLOPs per row) / R that `parallel.pipeline_overhead_rows`
takes (see megams/parallel/partition.py).

balance: for 2 stages the `cost` and `uniform` partitions, for 3 and 4 stages the `cost`
partition and an explicit layout giving the coarse scales their own stage(s). Per stage: the
predicted share of the FLOPs, the measured compute (median over the timed steps of the time in
DeepSpeed's ForwardPass + BackwardPass on that rank) and the same stages timed one after another
in one process ("isolated": no other rank competing for the cores). Balance = slowest / mean.
bubble: the idle fraction of every stage, 1 - compute / (start of step .. end of its last
backward pass), against (p - 1) / (m + p - 1).

One thread per rank (OMP_NUM_THREADS=1); with more ranks than cores the in-pipeline times
include waiting for a core, which the isolated column does not. Timed runs share the cores
here: wrap in `flock /tmp/megams-heavy.lock`.
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


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["balance", "bubble", "calibrate"])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny", "bottom_up_30l.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--steps", type=int, default=4, help="timed steps (after 1 warm-up step)")
    p.add_argument("--micro-batches", type=int, nargs="+", default=None,
                   help="micro-batches per step (balance: one value, default 8; bubble: default 1 4 8)")
    p.add_argument("--stages", type=int, nargs="+", default=None, help="bubble: pipeline sizes (default 2)")
    return p.parse_args(argv)


def _cfg(args, stages, m, method="cost", layout=None):
    from megams.config import load_config
    base = load_config(args.config, args.set)
    sets = args.set + [f"parallel.pipeline={stages}", f"training.global_batch_size={base.training.micro_batch_size * m}",
                       f"parallel.pipeline_partition={method}", "parallel.zero_stage=0"]
    if layout is not None:
        sets.append(f"parallel.pipeline_layout=[{','.join(map(str, layout))}]")
    return load_config(args.config, sets)


def balance(args) -> str:
    from megams.bench import pipeline as bp
    m = (args.micro_batches or [8])[0]
    runs = [(2, "cost", None), (2, "uniform", None)]
    for p in (3, 4):
        runs += [(p, "cost", None), (p, "explicit", bp.scale_layout(_cfg(args, p, m), p))]
    out = []
    for p, method, layout in runs:
        cfg = _cfg(args, p, m, method, layout)
        ranks = bp.spawn_ranks(p, bp.pipeline_worker, (cfg, args.steps))
        isolated = bp.isolated_stage_times(cfg)
        out.append((p, method, layout, cfg, ranks, isolated))
        print(f"  done: {p} stages, {method} {layout or ''}", file=sys.stderr, flush=True)
    c0 = out[0][3]
    lines = [f"megams pipeline balance, {datetime.date.today()}, {bp.machine_line()}, 1 thread per rank",
             f"model: {os.path.relpath(args.config, ROOT)} {' '.join(args.set)} ({c0.model.type}, d={c0.model.d_model}, "
             f"seq {c0.data.seq_len}), micro-batch {c0.training.micro_batch_size} x {m} per step, fp32, "
             f"{args.steps} timed steps", ""]
    rows = []
    for p, method, layout, cfg, ranks, isolated in out:
        flop = bp.predicted_shares(cfg, overhead_rows=0)
        pred = bp.predicted_shares(cfg)
        names = bp.stage_names(cfg)
        comp = [r["compute_s"] for r in sorted(ranks, key=lambda r: r["stage"])]
        for s in range(p):
            rows.append([p, method + (f" {layout}" if layout else ""), s, names[s], f"{100 * flop[s]:.1f}%",
                         f"{100 * pred[s]:.1f}%", f"{1000 * comp[s]:.0f}", f"{100 * comp[s] / sum(comp):.1f}%",
                         f"{1000 * isolated[s]:.1f}", f"{100 * isolated[s] / sum(isolated):.1f}%"])
        bal = lambda xs: max(xs) / (sum(xs) / len(xs))  # noqa: E731
        spread = lambda xs: max(xs) / min(xs) - 1  # noqa: E731
        rows.append([p, method, "all", "balance: slowest / mean (max/min - 1)",
                     f"{bal(flop):.3f} ({100 * spread(flop):.0f}%)", f"{bal(pred):.3f} ({100 * spread(pred):.0f}%)",
                     "", f"{bal(comp):.3f} ({100 * spread(comp):.0f}%)",
                     "", f"{bal(isolated):.3f} ({100 * spread(isolated):.0f}%)"])
    lines.append(f"predicted cost = FLOPs + parallel.pipeline_overhead_rows={c0.parallel.pipeline_overhead_rows} rows "
                 f"per layer call (the partitioner's measure); FLOP share = the same with 0 rows")
    lines.append("")
    lines.append(bp.markdown_table(
        ["stages", "partition", "stage", "units (scales)", "FLOP share", "predicted cost share",
         "in-pipeline compute ms/step", "share", "isolated ms/micro-batch", "share"], rows))
    return "\n".join(lines)


def bubble(args) -> str:
    from megams.bench import pipeline as bp
    ms = args.micro_batches or [1, 4, 8]
    rows = []
    cfg = None
    for p in args.stages or [2]:
        for m in ms:
            cfg = _cfg(args, p, m)
            ranks = sorted(bp.spawn_ranks(p, bp.pipeline_worker, (cfg, args.steps)), key=lambda r: r["stage"])
            ideal = (p - 1) / (m + p - 1)
            for r in ranks:
                rows.append([p, m, r["stage"], f"{ideal:.3f}", f"{r['idle_fraction']:.3f}",
                             f"{1000 * r['compute_s']:.0f}", f"{1000 * r['window_s']:.0f}", f"{1000 * r['total_s']:.0f}"])
            print(f"  done: {p} stages, m={m}", file=sys.stderr, flush=True)
    lines = [f"megams pipeline bubble, {datetime.date.today()}, {bp.machine_line()}, 1 thread per rank",
             f"model: {os.path.relpath(args.config, ROOT)} {' '.join(args.set)}, cost partition, micro-batch "
             f"{cfg.training.micro_batch_size}, fp32, {args.steps} timed steps (medians)", "",
             bp.markdown_table(["stages p", "micro-batches m", "stage", "(p-1)/(m+p-1)", "measured idle fraction",
                                "fwd+bwd ms", "pipelined window ms", "step ms (with reductions + optimizer)"], rows)]
    return "\n".join(lines)


def calibrate(args) -> str:
    from collections import defaultdict

    from megams.bench import pipeline as bp
    from megams.config import load_config
    from megams.parallel.partition import unit_cost
    import torch
    torch.set_num_threads(1)
    cfg = load_config(args.config, args.set)
    mb = cfg.training.micro_batch_size
    timed = bp.unit_times(cfg)
    R, r0 = bp.fit_overhead(timed, mb)
    groups = defaultdict(list)
    for u, t in timed:
        groups[(u.kind, u.scale, u.seq_len)].append((u, t))
    rows = []
    for (kind, scale, L), items in groups.items():
        u = items[0][0]
        t = sum(x for _, x in items) / len(items)
        rows.append([kind, scale, L, len(items), f"{1000 * t:.2f}", f"{1000 * mb * u.flops / R:.2f}",
                     f"{1000 * mb * unit_cost(u, mb, r0) / R:.2f}"])
    return "\n".join([
        f"megams pipeline unit timings, {datetime.date.today()}, {bp.machine_line()}, 1 thread",
        f"model: {os.path.relpath(args.config, ROOT)} {' '.join(args.set)}, micro-batch {mb} x seq {cfg.data.seq_len}, "
        f"fp32, forward + backward, best of 3",
        f"fit: R = {R / 1e9:.1f} GFLOP/s, overhead_rows = {r0:.0f}  ->  --set parallel.pipeline_overhead_rows={round(r0)}",
        "", bp.markdown_table(["unit kind", "scale", "positions", "count", "measured ms (mean)",
                               "FLOPs / R ms", "with overhead ms"], rows)])


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    print({"balance": balance, "bubble": bubble, "calibrate": calibrate}[args.what](args), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Tensor parallelism side by side: tp=1, tp=2 and tp=2 with sequence parallelism on the same model.

    python tools/benchmark_tp.py [--config configs/tiny/bottom_up.yaml] [--set model.d_model=256 ...]
                                 [--batch 8] [--seq-len 256] [--steps 5] [--cores 2]

Each layout runs in its own processes (gloo on CPU, NCCL on GPUs), fwd + bwd + AdamW steps on
random tokens, fp32. Reported per layout: tokens/s; per rank: parameters, peak memory (CUDA:
max_memory_allocated; CPU: peak resident set size, reset after the model is built, and its rise
over that point); and the tensor-parallel communication of one step (fwd + bwd of one micro-batch)
predicted by `predict_tp_comm` vs measured by `count_comm` (calls, bytes of the full tensors,
and ring wire bytes sent per rank). Data-parallel gradient reduction is not part of it (dp = 1).
Timed runs share the cores here: wrap in `flock /tmp/megams-heavy.lock`.
"""
from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import platform
import socket
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LAYOUTS = [("tp=1", 1, False), ("tp=2", 2, False), ("tp=2 + SP", 2, True)]
MiB = 2 ** 20


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny", "bottom_up.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="CPU threads shared by a layout's ranks")
    return p.parse_args(argv)


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _reset_peak_memory(cuda: bool) -> int:
    import torch
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (VmHWM) to the current RSS
        f.write("5")
    return _rss("VmRSS")


def _peak_memory(cuda: bool) -> int:
    import torch
    return torch.cuda.max_memory_allocated() if cuda else _rss("VmHWM")


def _worker(rank, world, port, sp, args, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch
    import torch.distributed as dist

    from megams.config import load_config
    from megams.models import build_model
    from megams.parallel.comm_volume import predict_tp_comm
    from megams.parallel.dims import ParallelDims
    from megams.parallel.mappings import count_comm
    from megams.parallel.tensor_parallel import apply_tp
    from megams.training.loss import lm_loss

    torch.set_num_threads(max(1, args.cores // world))
    cuda = torch.cuda.is_available()
    device = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    sets = args.set + [f"parallel.tensor={world}", f"parallel.sequence_parallel={sp}", f"data.seq_len={args.seq_len}"]
    cfg = load_config(args.config, sets)
    model = build_model(cfg.model, seed=0, device=device)
    loss_fn = lm_loss
    if world > 1:
        model, loss_fn = apply_tp(model, ParallelDims(world, tp=world, rank=rank).build_groups(), cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq_len + 1), generator=g).to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step():
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    before = _reset_peak_memory(cuda)
    with count_comm() as comm:  # the first step: what one fwd + bwd communicates
        step()
    step()
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    dt = (time.perf_counter() - t0) / args.steps
    peak = _peak_memory(cuda)
    predicted = predict_tp_comm(cfg.model, args.batch, args.seq_len, world, sp)
    queue.put((rank, {
        "step_s": dt, "params": sum(p.numel() for p in model.parameters()), "peak": peak, "rise": peak - before,
        "comm": (sum(comm.calls.values()), comm.total_bytes, comm.wire_bytes, dict(comm.bytes)),
        "predicted": (sum(predicted.calls.values()), predicted.total_bytes, predicted.wire_bytes,
                      dict(predicted.bytes)),
        "model": cfg.model, "threads": torch.get_num_threads(), "device": device}))
    dist.barrier()
    dist.destroy_process_group()


def run_layout(world: int, sp: bool, args) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, world, port, sp, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"a rank of the tp={world} run exited with {p.exitcode}")
    return [results[r] for r in range(world)]


def _per_rank(values, fmt):
    return " / ".join(fmt(v) for v in values)


def report(runs, args) -> str:
    first = runs[0][1][0]
    m = first["model"]
    tokens = args.batch * args.seq_len
    lines = [
        f"megams tensor-parallel benchmark, {datetime.date.today()}, {platform.node() or 'host'}: "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {__import__('torch').__version__}, "
        f"device {first['device'].split(':')[0]}",
        f"model {m.type} d_model={m.d_model} heads={m.n_heads} ffn={m.ffn_size} vocab={m.vocab_size} "
        f"({os.path.relpath(args.config, ROOT)} {' '.join(args.set)}); batch {args.batch} x {args.seq_len} tokens, "
        f"fp32, fwd+bwd+AdamW, {args.steps} timed steps after 2 warm-up",
        "",
        "| | " + " | ".join(name for name, _ in runs) + " |",
        "|---|" + "---|" * len(runs),
    ]

    def row(label, fn):
        lines.append(f"| {label} | " + " | ".join(fn(res) for _, res in runs) + " |")

    row("threads per rank", lambda r: str(r[0]["threads"]))
    row("tokens/s", lambda r: f"{tokens / max(x['step_s'] for x in r):,.0f}")
    row("step time (ms)", lambda r: f"{1000 * max(x['step_s'] for x in r):.0f}")
    row("parameters per rank", lambda r: _per_rank([x["params"] for x in r], lambda v: f"{v:,}"))
    row("peak memory per rank (MiB)", lambda r: _per_rank([x["peak"] for x in r], lambda v: f"{v / MiB:.0f}"))
    row("  rise during the steps (MiB)", lambda r: _per_rank([x["rise"] for x in r], lambda v: f"{v / MiB:.0f}"))
    row("TP collectives per step: predicted / measured",
        lambda r: f"{r[0]['predicted'][0]} / {r[0]['comm'][0]}")
    row("TP bytes per step (MiB): predicted / measured",
        lambda r: f"{r[0]['predicted'][1] / MiB:.2f} / {r[0]['comm'][1] / MiB:.2f}")
    row("wire bytes sent per rank (MiB): predicted / measured",
        lambda r: f"{r[0]['predicted'][2] / MiB:.2f} / {r[0]['comm'][2] / MiB:.2f}")
    kinds = sorted({k for _, r in runs for k in r[0]["comm"][3]})
    for k in kinds:
        row(f"  {k} (MiB): predicted / measured",
            lambda r, k=k: f"{r[0]['predicted'][3].get(k, 0) / MiB:.2f} / {r[0]['comm'][3].get(k, 0) / MiB:.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    runs = [(name, run_layout(world, sp, args)) for name, world, sp in LAYOUTS]
    print(report(runs, args), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

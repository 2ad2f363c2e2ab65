#!/usr/bin/env python
"""One-command GPU benchmark: tokens/s and MFU (vs the GPU's datasheet bf16 peak) of megams'
vanilla and bottom-up models at ~350M and ~1B parameters, bf16, fused kernels where available.

    python tools/benchmark_gpu.py                      # one GPU: ~5 min on an H100, writes bench_out/gpu.json
    torchrun --nproc_per_node 8 tools/benchmark_gpu.py # data parallel over NCCL (DDP), per-GPU numbers
    python tools/benchmark_gpu.py --cpu                # CPU fallback at toy sizes (checks the script runs)

What it uses when present: CUDA + bf16 autocast, SDPA (flash / memory-efficient attention), TF32
matmuls, fused AdamW (torch; apex's FusedAdam if apex imports), torch.compile (--compile),
NCCL for more than one process. Byte-level vocabulary (256), as every megams benchmark.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name: (d_model, heads, vanilla layers). Bottom-up keeps the width and the parameter count
# (same number of blocks: 2 full-resolution + the rest at n/4 and n/16).
GPU_SIZES = {"350M": (1024, 16, 28), "1B": (1792, 14, 26), "d2048": (2048, 16, 24)}  # d2048: tools/gpu_check.sh
CPU_SIZES = {"toy": (64, 4, 4)}


def model_cfg(kind: str, d: int, heads: int, L: int):
    from megams.config.schema import ModelConfig
    c = dict(d_model=d, n_heads=heads, vocab_size=256, norm="rmsnorm", mlp="gelu", positions="rotary")
    if kind == "vanilla":
        return ModelConfig(type="vanilla", n_layers=L, **c)
    n1 = max(1, (L - 2) // 3)
    return ModelConfig(type="bottom_up", shorten_factors=[4, 4], layers_per_scale=[1, n1, L - 2 - n1], n_post=1,
                       pooling="linear", aggregation="sum", upsampling="linear", **c)


def make_optimizer(params, lr: float, device: str):
    from megams.training.kernels import find_apex  # NVIDIA apex by its API, not by `import apex`
    apex, _ = find_apex()
    if apex is not None and device.startswith("cuda"):
        return apex.FusedAdam(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1, adam_w_mode=True), "apex FusedAdam"
    import torch
    fused = device.startswith("cuda")
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=fused), \
        f"torch AdamW{' (fused)' if fused else ''}"


def bench_one(kind, size, dims, args, device, peak, world, rank):
    import torch
    import torch.nn.functional as F

    from megams.models import build_model
    from megams.models.cost import flops_per_token
    cfg = model_cfg(kind, *dims)
    model = build_model(cfg, seed=0, device=device)
    n_params = sum(p.numel() for p in model.parameters())
    if args.ac:
        from megams.bench.runner import apply_block_checkpointing
        apply_block_checkpointing(model)
    fwd = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        fwd = DDP(model, device_ids=[int(os.environ.get("LOCAL_RANK", 0))] if device.startswith("cuda") else None)
    if args.compile:
        fwd = torch.compile(fwd)
    opt, opt_name = make_optimizer(model.parameters(), 3e-4, device)
    T, B = args.seq_len, args.batch
    bf16 = device.startswith("cuda") or args.bf16
    ctx = (lambda: torch.autocast(device.split(":")[0], dtype=torch.bfloat16)) if bf16 else None
    g = torch.Generator(device="cpu").manual_seed(rank)
    x = torch.randint(0, 256, (B, T + 1), generator=g).to(device)
    inp, tgt = x[:, :-1], x[:, 1:]

    def step():
        if ctx:
            with ctx():
                logits = fwd(inp)
        else:
            logits = fwd(inp)
        loss = F.cross_entropy(logits.float().reshape(-1, 256), tgt.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    tps = B * T / dt  # per GPU
    fpt = flops_per_token(cfg, T)
    row = {"model": kind, "size": size, "params": n_params, "d_model": dims[0], "layers": dims[2],
           "seq_len": T, "micro_batch": B, "world": world, "tokens_per_s_per_gpu": tps,
           "tokens_per_s_total": tps * world, "tflops_per_gpu": fpt * tps / 1e12, "mfu": fpt * tps / peak,
           "step_s": dt, "warmup_s": warm_s, "loss": float(loss.detach()), "optimizer": opt_name,
           "peak_mem_gib": (torch.cuda.max_memory_allocated() / 2 ** 30) if device.startswith("cuda") else None}
    del model, fwd, opt
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="CPU fallback at toy sizes (no GPU needed)")
    p.add_argument("--sizes", nargs="*", default=None, help=f"subset of {list(GPU_SIZES)}")
    p.add_argument("--models", nargs="*", default=["vanilla", "bottom_up"])
    p.add_argument("--seq-len", type=int, default=None, help="default 2048 (GPU) / 64 (CPU)")
    p.add_argument("--batch", type=int, default=None, help="micro batch per GPU; default 8 (GPU) / 2 (CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps; default 10 (GPU) / 2 (CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps; default 3 (GPU) / 1 (CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (first step compiles)")
    p.add_argument("--ac", action="store_true", help="activation checkpointing per block")
    p.add_argument("--bf16", action="store_true", help="CPU: bf16 autocast too (GPU always uses bf16)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench_out", "gpu.json"))
    a = p.parse_args(argv)
    import torch
    use_cuda = torch.cuda.is_available() and not a.cpu
    cpu = not use_cuda
    a.seq_len = a.seq_len or (64 if cpu else 2048)
    a.batch = a.batch or (2 if cpu else 8)
    a.steps = a.steps or (2 if cpu else 10)
    a.warmup = a.warmup if a.warmup is not None else (1 if cpu else 3)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = "cpu"
        if a.cpu and not os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(min(2, os.cpu_count() or 1))
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("nccl" if use_cuda else "gloo")
    from megams.training.mfu import measure_matmul_flops, peak_flops
    if use_cuda:
        peak = peak_flops("bf16", device)
        peak_src = f"datasheet dense bf16 for {torch.cuda.get_device_name()}"
    else:
        dt = torch.bfloat16 if a.bf16 else torch.float32
        peak = measure_matmul_flops(dt, 512, seconds=0.3)
        peak_src = f"measured {dt} 512^3 matmul on CPU"
    from megams.training.kernels import find_apex
    have_apex = find_apex()[0] is not None
    sizes = CPU_SIZES if cpu else GPU_SIZES
    names = [s for s in (a.sizes or list(sizes)) if s in sizes]
    rows = []
    t_all = time.time()
    for size in names:
        for kind in a.models:
            r = bench_one(kind, size, sizes[size], a, device, peak, world, rank)
            rows.append(r)
            if rank == 0:
                print(f"{kind:9s} {size:5s} {r['params'] / 1e6:8.1f}M params  {r['tokens_per_s_per_gpu']:10.0f} tok/s/GPU  "
                      f"{r['tflops_per_gpu']:7.2f} TFLOP/s  MFU {r['mfu']:6.1%}"
                      + (f"  peak {r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] else ""), flush=True)
    report = {"device": torch.cuda.get_device_name() if use_cuda else platform.processor() or "cpu",
              "peak_flops": peak, "peak_source": peak_src, "torch": torch.__version__,
              "cuda": torch.version.cuda, "nccl": (".".join(map(str, torch.cuda.nccl.version())) if use_cuda else None),
              "apex": have_apex, "compile": a.compile, "activation_checkpointing": a.ac, "world": world,
              "date": time.strftime("%Y-%m-%d %H:%M"), "wall_s": time.time() - t_all, "rows": rows}
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {a.out} ({report['wall_s']:.0f} s)")
    if world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

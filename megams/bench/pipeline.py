"""Pipeline and memory measurements (tools/benchmark_pipeline.py, tools/benchmark_memory.py).

Each measured layout runs in fresh local ranks (gloo on CPU, one thread each unless told
otherwise) started by `spawn_ranks`; a worker returns a dict per rank.

- `pipeline_worker`: a pipeline trained for a few steps on random tokens; per rank its compute
  (time in DeepSpeed's ForwardPass + BackwardPass instructions, from `StageTimer`) and its idle
  fraction, 1 - compute / the pipelined window (first stage starting the step .. last forward /
  backward of any stage), to set against (p - 1) / (m + p - 1).
- `isolated_stage_times` / `unit_times`: the same stages (or every unit) timed one after another
  in one process, nothing else competing for the cores; `fit_overhead` fits the partition's
  per-layer overhead to the unit times.
- `memory_worker`: peak resident memory of a rank of a data-parallel run with a given activation
  checkpointing mode and ZeRO stage (VmHWM reset just before the model is built; the steps after
  the first measured separately).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import statistics
import time
from typing import Callable, List, Optional, Sequence

MiB = 2 ** 20


# --- local ranks ----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, threads, fn, args, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch
    import torch.distributed as dist
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        out = fn(rank, world, *args)
        dist.barrier()
        queue.put((rank, "ok", out))
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        import traceback
        queue.put((rank, "error", f"{e}\n{traceback.format_exc()}"))
        os._exit(1)


def spawn_ranks(world: int, fn: Callable, args: tuple = (), threads: int = 1, timeout: float = 1800) -> List:
    """Run `fn(rank, world, *args)` in `world` fresh processes (torch.distributed initialised, gloo,
    loopback); returns the per-rank results. `fn` must be importable (module level)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, threads, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in procs:
            rank, status, payload = queue.get(timeout=timeout)
            if status == "error":
                errors.append(f"rank {rank}: {payload}")
                break
            results[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=5 if errors else None)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world)]


# --- peak memory ----------------------------------------------------------------------------------
def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> int:
    """Reset the peak resident set size (VmHWM) to the current one; returns the current one."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def peak_rss() -> int:
    return _status("VmHWM")


# --- building and feeding ---------------------------------------------------------------------------
def _random_batches(cfg, n: int, seed: int = 0):
    import torch
    g = torch.Generator().manual_seed(seed)
    mb, T, V = cfg.training.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size
    out = []
    for _ in range(n):
        ids = torch.randint(0, V, (mb, T + 1), generator=g)
        out.append((ids[:, :-1], ids[:, 1:]))
    return out


def _layout(cfg):
    from megams.parallel.dims import build_parallel_dims
    from megams.training.trainer import Layout
    import torch.distributed as dist
    dims = build_parallel_dims(cfg)
    return Layout(dist.get_world_size(), dist.get_rank(), dims.dp_size, dims.dp_rank, dims.tp_size, dims.pp_size,
                  dims)


def _plain_model(cfg, layout):
    from megams.models import build_model
    from megams.parallel.checkpointing import apply_ac
    from megams.training.loss import lm_loss
    model, loss_fn = build_model(cfg.model, seed=0), lm_loss
    if layout.tp > 1:
        from megams.parallel.tensor_parallel import apply_tp
        model, loss_fn = apply_tp(model, layout.dims, cfg)
    apply_ac(model, cfg, layout.dims)
    return model, loss_fn


# --- pipeline: per-stage compute and bubble ---------------------------------------------------------
def pipeline_worker(rank, world, cfg, steps: int, warmup: int = 1) -> dict:
    """Train `cfg` (parallel.pipeline = world) for warmup + steps on random tokens; per-step
    instruction times of this rank (the timed steps)."""
    from megams.training.engine import precision_mode
    from megams.training.pipeline_step import PipelineTraining, StageTimer
    layout = _layout(cfg)
    model, loss_fn = _plain_model(cfg, layout)
    pipe = PipelineTraining(cfg, layout)
    engine, _ = pipe.build_engine(model, loss_fn, precision_mode(cfg, "cpu"))
    del model
    timer = StageTimer(engine)
    batches = _random_batches(cfg, pipe.micro_batches)
    for _ in range(warmup + steps):
        pipe.train_step(engine, batches)
    timed = timer.steps[warmup:]
    compute = [s.get("ForwardPass", 0.0) + s.get("BackwardPass", 0.0) for s in timed]
    # the pipelined part of a step, the same for every stage: from the first stage starting it to the
    # last forward / backward pass of any stage (perf_counter is CLOCK_MONOTONIC: one clock for all ranks)
    import torch.distributed as dist
    spans = [None] * world
    dist.all_gather_object(spans, [(s["start"], s["last_compute_end"]) for s in timed])
    window = [max(r[i][1] for r in spans) - min(r[i][0] for r in spans) for i in range(len(timed))]
    return {"stage": layout.dims.pp_rank, "compute_s": statistics.median(compute),
            "forward_s": statistics.median(s.get("ForwardPass", 0.0) for s in timed),
            "backward_s": statistics.median(s.get("BackwardPass", 0.0) for s in timed),
            "window_s": statistics.median(window),
            "total_s": statistics.median(s["total"] for s in timed),
            "idle_fraction": statistics.median(1 - c / w for c, w in zip(compute, window))}


def _time_ranges(cfg, ranges, repeats: int = 3) -> List[float]:
    """Forward + backward time (best of `repeats`) of layer ranges [a, b) of the model's pipeline
    layer list for one micro-batch, run one after another in THIS process; each range gets the
    input the previous layers produce, as a pipeline stage would receive it."""
    import torch
    from megams.models import build_model
    from megams.parallel.checkpointing import apply_ac
    from megams.parallel.pipeline import LocalStage, model_factors, plan_pipeline
    from megams.training.loss import lm_loss
    model = build_model(cfg.model, seed=0)
    apply_ac(model, cfg)
    one = cfg.model_copy(update={"parallel": cfg.parallel.model_copy(
        update={"pipeline": 1, "pipeline_partition": "cost", "pipeline_layout": []})})
    plan = plan_pipeline(model, one, 1)  # the whole layer list; `ranges` cut it
    tied: dict = {}
    stages = [LocalStage(plan, a, b, model_factors(cfg.model), tied) for a, b in ranges]
    (x, y), = _random_batches(cfg, 1)
    inputs, times = [x], []
    with torch.no_grad():  # every range's input, as the previous stage sends it
        for st in stages[:-1]:
            inputs.append(st(inputs[-1]))
    for st, inp in zip(stages, inputs):
        best = float("inf")
        for _ in range(repeats + 1):
            leaf = inp.detach().requires_grad_() if inp.is_floating_point() else inp
            t0 = time.perf_counter()
            out = st(leaf)
            if st.output_scales is None:  # the last range: logits -> loss
                lm_loss(out, y).backward()
            else:
                out.backward(torch.ones_like(out))
            best = min(best, time.perf_counter() - t0)
            st.zero_grad(set_to_none=True)
        times.append(best)
    return times


def isolated_stage_times(cfg, repeats: int = 3) -> List[float]:
    """Forward + backward time of each stage of `cfg`'s partition for one micro-batch, the stages run
    one after another in this process (no competition for the cores): the balance without the pipeline."""
    from megams.models import build_model
    from megams.parallel.pipeline import plan_pipeline
    b = plan_pipeline(build_model(cfg.model, device="meta"), cfg, cfg.parallel.pipeline).layer_bounds
    return _time_ranges(cfg, list(zip(b, b[1:])), repeats)


def unit_times(cfg, repeats: int = 3):
    """[(unit, seconds)]: forward + backward of every pipeline unit for one micro-batch, in isolation."""
    from megams.models import build_model
    from megams.parallel.pipeline import plan_pipeline
    plan = plan_pipeline(build_model(cfg.model, device="meta"), cfg, 1)
    starts = [plan.unit_of_layer.index(u) for u in range(len(plan.units))] + [len(plan.specs)]
    return list(zip(plan.units, _time_ranges(cfg, list(zip(starts, starts[1:])), repeats)))


def fit_overhead(timed, micro_batch: int) -> tuple:
    """Fit time = (micro_batch x flops + overhead_rows x flops per row) / R over the units with FLOPs,
    minimising relative errors. Returns (R in FLOP/s, overhead_rows)."""
    import numpy as np
    rows = [(u, t) for u, t in timed if u.flops > 0]
    A = np.array([[micro_batch * u.flops / t, u.flops / u.seq_len / t] for u, t in rows])
    a, b = np.linalg.lstsq(A, np.ones(len(rows)), rcond=None)[0]
    return 1.0 / a, b / a


def predicted_shares(cfg, overhead_rows: Optional[float] = None) -> List[float]:
    """Each stage's share of the partition cost (`unit_cost`; `overhead_rows` default: the config's)."""
    from megams.models import build_model
    from megams.parallel.partition import unit_cost
    from megams.parallel.pipeline import plan_pipeline
    plan = plan_pipeline(build_model(cfg.model, device="meta"), cfg, cfg.parallel.pipeline)
    r0 = cfg.parallel.pipeline_overhead_rows if overhead_rows is None else overhead_rows
    b = plan.unit_bounds
    f = [sum(unit_cost(u, cfg.training.micro_batch_size, r0) for u in plan.units[b[s]:b[s + 1]])
         for s in range(len(b) - 1)]
    return [x / sum(f) for x in f]


def scale_layout(cfg, stages: int) -> List[int]:
    """An explicit layout (units per stage) that gives the coarse scales their own stage(s): the
    units split into regions [scale 0 up to the first shortening | scale 1 | .. | scale S | the
    rest at full resolution]; with fewer stages than regions the coarse regions are merged."""
    from megams.parallel.partition import pipeline_units
    units = pipeline_units(cfg.model, cfg.data.seq_len)
    regions: List[List] = [[]]
    for u in units:
        if u.kind == "shorten" or (u.kind in ("aggregate", "upsample") and regions[-1] and regions[-1][-1].scale > 0):
            regions.append([])
        regions[-1].append(u)
    sizes = [len(r) for r in regions]
    while len(sizes) > stages:  # merge the two smallest coarse neighbours (never the first or the last)
        i = min(range(1, len(sizes) - 2), key=lambda j: sizes[j] + sizes[j + 1]) if len(sizes) > 3 else 0
        sizes[i:i + 2] = [sizes[i] + sizes[i + 1]]
    if len(sizes) < stages:
        raise ValueError(f"{len(sizes)} scale regions cannot fill {stages} stages")
    return sizes


def stage_names(cfg) -> List[str]:
    from megams.models import build_model
    from megams.parallel.pipeline import plan_pipeline
    plan = plan_pipeline(build_model(cfg.model, device="meta"), cfg, cfg.parallel.pipeline)
    b = plan.unit_bounds
    out = []
    for s in range(len(b) - 1):
        us = plan.units[b[s]:b[s + 1]]
        out.append(f"{us[0].name}..{us[-1].name} (scales {sorted({u.scale for u in us})})")
    return out


# --- memory ---------------------------------------------------------------------------------------
def memory_worker(rank, world, cfg, steps: int = 3) -> dict:
    """Peak RSS of this rank training `cfg` (no pipeline) for `steps` steps on random tokens."""
    import torch
    from megams.training.engine import build_engine, precision_mode
    layout = _layout(cfg)
    mode = precision_mode(cfg, "cpu")
    base = reset_peak_rss()
    model, loss_fn = _plain_model(cfg, layout)
    engine, _, _ = build_engine(cfg, model, layout.dp, mode, mpu=layout.dims.mpu if layout.dims else None)
    del model
    built = _status("VmRSS")
    batches = _random_batches(cfg, cfg.grad_accum_steps(layout.dp), seed=rank)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast_bf16" else None

    def step():
        for x, y in batches:
            if autocast is not None:
                with autocast:
                    logits = engine(x)
            else:
                logits = engine(x)
            engine.backward(loss_fn(logits, y))
            engine.step()

    step()  # set-up peaks (DeepSpeed flattening parameters, optimizer states appearing) happen by here
    first = peak_rss()
    reset_peak_rss()
    t0 = time.perf_counter()
    for _ in range(steps - 1):
        step()
    step_s = (time.perf_counter() - t0) / max(1, steps - 1)
    return {"rank": rank, "baseline": base, "after_build": built, "peak_first": first, "peak_steady": peak_rss(),
            "peak": max(first, peak_rss()), "step_s": step_s}


def fmt_mib(v: float) -> str:
    return f"{v / MiB:.0f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def machine_line() -> str:
    import platform
    import torch
    return (f"{platform.node() or 'host'}: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}")


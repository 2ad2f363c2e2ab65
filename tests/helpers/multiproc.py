"""Start N real ranks (gloo, loopback) once and run a list of cases in them.

    results = run_ranks(2, [(my_case, (arg,)), (other_case, ())], timeout=120)
    results[case_index][rank] -> whatever that case returned on that rank

Each case is a module-level function `case(rank, world_size, *args)`; it runs after
`torch.distributed.init_process_group(backend)` (gloo unless `backend="nccl"`) with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* set,
so DeepSpeed and megams.parallel can be initialised inside it. Cases run one after another
in the same processes (a barrier between them), which amortises the start-up cost.
A failing rank's traceback is re-raised in the test; a hung job is killed after `timeout`.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import tempfile
import traceback
from typing import Any, Callable, Sequence


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, cases, outdir: str, env: dict, backend: str) -> None:
    os.environ.update({k: str(v) for k, v in env.items()})
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch
    import torch.distributed as dist
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    results = []
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        for fn, args in cases:
            results.append(fn(rank, world_size, *args))
            dist.barrier()
        with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(("ok", results), f)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # report to the parent, which raises it in the test
        with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(("error", traceback.format_exc()), f)
        os._exit(1)


def run_ranks(world_size: int, cases: Sequence[tuple[Callable, tuple]], timeout: float = 180,
              env: dict | None = None, backend: str = "gloo") -> list[list[Any]]:
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="megams-ranks-") as outdir:
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, list(cases), outdir, env or {}, backend))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        import time
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        per_rank, errors = [], []
        for r in range(world_size):
            path = os.path.join(outdir, f"rank{r}.pkl")
            if not os.path.exists(path):
                errors.append(f"rank {r}: no result (exit code {procs[r].exitcode})")
                per_rank.append(None)
                continue
            with open(path, "rb") as f:
                status, payload = pickle.load(f)
            if status == "error":
                errors.append(f"rank {r} failed:\n{payload}")
                per_rank.append(None)
            else:
                per_rank.append(payload)
        if errors:
            raise RuntimeError("\n".join(errors))
        if hung:
            raise TimeoutError(f"ranks {hung} still running after {timeout}s")
    return [[per_rank[r][i] for r in range(world_size)] for i in range(len(cases))]

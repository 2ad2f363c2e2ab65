#!/usr/bin/env python
"""Device memory of every rank role (pipeline stage x tensor rank) of a layout, planned without a GPU.

    python tools/plan_memory.py --config CFG --world N [--set k=v ...] [--device-memory 80] [--json]
                                [--build-rank R]

Prints, per role: parameters, gradients, optimizer states (by ZeRO stage and precision, as DeepSpeed
lays them out), activations per micro-batch (by activation checkpointing mode) x the micro-batches
1F1B keeps in flight, transient peaks, communication buffers, and the total against
--device-memory GiB (see megams/parallel/memory_plan.py). Every rank is built on the meta device
in torch's fake process group: no GPU, no real ranks.

--build-rank R materialises rank R's shard for real on the host (megams.parallel.build with
device="cpu": only this rank's stage and tensor slice, one full parameter at a time) and reports
its measured bytes against the plan, and the peak RSS of this process.
Exit 0 (also when the plan does not fit: the table says so); bad input: one `error:` line, exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".venv", "torch_extensions"))


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise SystemExit(_fail(f"tools/plan_memory.py: {message}"))


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 2


def parse_args(argv):
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--world", type=int, required=True, help="number of ranks (GPUs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--device-memory", type=float, default=80.0, help="GiB per device (default 80)")
    p.add_argument("--json", action="store_true", help="the plan as JSON on stdout instead of the table")
    p.add_argument("--device-kind", default=None, metavar="NAME",
                   help="cut the pipeline as on this device (torch.cuda.get_device_name(), or cpu): its measured "
                        "parallel.pipeline_overhead_rows (megams/parallel/partition.py); default: this machine")
    p.add_argument("--build-rank", type=int, default=None, metavar="R",
                   help="materialise rank R's shard on the host and compare with the plan")
    return p.parse_args(argv)


def build_rank(cfg, plan, rank: int) -> dict:
    """Materialise `rank`'s shard on the host; measured bytes vs the plan's, peak RSS."""
    from megams.parallel.dims import rank_coords
    from megams.parallel.memory_plan import build_role
    t0 = time.perf_counter()
    _, local = build_role(cfg, plan.world_size, rank, device="cpu")
    seconds = time.perf_counter() - t0
    named = local.local_parameters()
    elements = sum(p.numel() for _, p in named)
    measured = local.shard_bytes()
    storages = {}
    for _, p in named:  # what the shard really keeps alive: a slice that views a full tensor keeps all of it
        st = p.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    _, stage, tp_rank = rank_coords(rank, plan.tp, plan.pp)
    role = plan.roles[stage]
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"rank": rank, "stage": stage, "tp_rank": tp_rank, "seconds": round(seconds, 2),
            "measured_elements": elements, "planned_elements": role.params, "measured_bytes": measured,
            "storage_bytes": sum(storages.values()),
            "dtype": str(named[0][1].dtype) if named else None, "peak_rss_bytes": peak_rss,
            "rss_limit_bytes": int(1.3 * measured + 2 * 2 ** 30)}


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    from megams.config import ConfigError, load_config
    from megams.parallel.memory_plan import GiB, format_plan, plan_memory
    if args.world < 1:
        return _fail(f"--world must be >= 1, got {args.world}")
    if args.device_memory <= 0:
        return _fail(f"--device-memory must be > 0 GiB, got {args.device_memory}")
    if args.build_rank is not None and not 0 <= args.build_rank < args.world:
        return _fail(f"--build-rank {args.build_rank} is outside the world of {args.world} ranks (0..{args.world - 1})")
    try:
        cfg = load_config(args.config, args.set)
        plan = plan_memory(cfg, args.world, int(args.device_memory * GiB), args.device_kind)
    except ConfigError as e:
        return _fail(str(e))
    out = plan.to_dict()
    text = format_plan(plan, os.path.relpath(os.path.abspath(args.config), ROOT))
    if args.build_rank is not None:
        b = build_rank(cfg, plan, args.build_rank)
        out["build_rank"] = b
        ok = b["measured_elements"] == b["planned_elements"]
        text += (f"\n\nbuilt rank {b['rank']} (stage {b['stage']}, tensor rank {b['tp_rank']}) on the host in "
                 f"{b['seconds']} s: {b['measured_elements']:,} elements ({b['dtype']}, {b['measured_bytes'] / GiB:.3f} GiB), "
                 f"plan {b['planned_elements']:,}: {'equal' if ok else 'DIFFERENT'}; storage held "
                 f"{b['storage_bytes'] / GiB:.3f} GiB; peak RSS "
                 f"{b['peak_rss_bytes'] / GiB:.3f} GiB (1.3 x shard + 2 GiB = {b['rss_limit_bytes'] / GiB:.3f} GiB)")
    print(json.dumps(out, indent=1) if args.json else text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

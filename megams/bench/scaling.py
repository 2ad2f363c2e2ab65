"""Study 4: tokens/s and memory per rank across dp / tp / pp layouts at 2 and 4 ranks (real
trainer under torchrun, gloo, 1 thread per rank), and the pipeline partition's cost balance
(cost-balanced vs uniform-by-layers, computed from `megams.parallel.partition`). A layout the
current build refuses is reported with its error line, not hidden."""
from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

from megams.bench import report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAYOUTS = [(2, 1, 1), (1, 2, 1), (1, 1, 2), (4, 1, 1), (2, 2, 1), (1, 2, 2)]  # (dp, tp, pp)


def partition_balance(configs=("bottom_up", "vanilla", "top_down"), stages=(2, 4), seq_len: int = 256) -> list:
    from megams.config import load_config
    from megams.parallel.partition import partition, pipeline_units
    rows = []
    for name in configs:
        cfg = load_config(os.path.join(ROOT, "configs", "tiny", f"{name}.yaml"))
        units = pipeline_units(cfg.model, seq_len)
        for p in stages:
            row = {"config": name, "stages": p}
            for method in ("cost", "uniform"):
                b = partition(units, p, method)
                f = [sum(u.flops for u in units[b[s]:b[s + 1]]) for s in range(p)]
                row[method] = max(f) / (sum(f) / p)  # slowest stage / mean: 1.0 is perfect balance
            rows.append(row)
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(dp: int, tp: int, pp: int, out_dir: str, steps: int, config: str, timeout: float = 150) -> dict:
    n = dp * tp * pp
    run_dir = os.path.abspath(os.path.join(out_dir, "runs", f"dp{dp}tp{tp}pp{pp}"))
    shutil.rmtree(run_dir, ignore_errors=True)
    gb = 8 * dp
    argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={_free_port()}",
            os.path.join(ROOT, "launch", "pretrain.py"), "--config", config,
            "--set", f"parallel.tensor={tp}", "--set", f"parallel.pipeline={pp}",
            "--set", f"parallel.zero_stage={1 if pp > 1 else 0}",
            "--set", "training.micro_batch_size=4", "--set", f"training.global_batch_size={gb}",
            "--set", f"training.max_steps={steps}", "--set", f"training.run_dir={run_dir}",
            "--set", f"training.eval_interval={steps}", "--set", "checkpoint.interval=0",
            "--set", "logging.progress_bar=false"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, DS_ACCELERATOR="cpu",
               PYTHONWARNINGS="ignore::FutureWarning", MASTER_ADDR="127.0.0.1")
    row = {"dp": dp, "tp": tp, "pp": pp, "ranks": n}
    t0 = time.time()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timed out after {timeout:.0f} s"}
    row["wall_s"] = time.time() - t0
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if proc.returncode != 0 or not os.path.exists(metrics):
        err = [x for x in (proc.stderr + proc.stdout).splitlines() if "rror" in x]
        return {**row, "error": (err[-1] if err else f"exit {proc.returncode}")[:200]}
    recs = [json.loads(x) for x in open(metrics) if "tokens_per_s" in x]
    timed = recs[min(3, len(recs) - 1):]
    row.update({"tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
                "peak_rss_rank0_bytes": max(r["peak_mem_bytes"] for r in recs)})
    return row


def run(out_dir: str, threads: int = 1, steps: int = 8, config: str = "", layouts=None, log=print) -> int:
    config = config or os.path.join(ROOT, "configs", "tiny", "vanilla.yaml")
    t_all = time.time()
    balance = partition_balance()
    rows = []
    for dp, tp, pp in (LAYOUTS if layouts is None else layouts):
        r = run_layout(dp, tp, pp, out_dir, steps, config)
        rows.append(r)
        log(f"[scaling] dp={dp} tp={tp} pp={pp}: " + (f"error: {r['error']}" if "error" in r else
                                                      f"{r['tokens_per_s']:.0f} tok/s, rank-0 peak RSS "
                                                      f"{r['peak_rss_rank0_bytes'] / report.MiB:.0f} MiB"))
    cols = [("dp", lambda r: r["dp"]), ("tp", lambda r: r["tp"]), ("pp", lambda r: r["pp"]),
            ("ranks", lambda r: r["ranks"]), ("tokens/s", lambda r: r.get("tokens_per_s")),
            ("rank-0 peak RSS MiB", lambda r: r["peak_rss_rank0_bytes"] / report.MiB if "error" not in r else None),
            ("note", lambda r: r.get("error", ""))]
    bcols = [("config", lambda r: f"configs/tiny/{r['config']}.yaml"), ("stages", lambda r: r["stages"]),
             ("slowest/mean stage, cost-balanced", lambda r: r["cost"]),
             ("slowest/mean stage, uniform by layers", lambda r: r["uniform"])]
    text = report.table(rows, cols) + "\n\nPipeline partition balance (FLOPs):\n\n" + report.table(balance, bcols)
    payload = {"study": "scaling", "machine": report.machine(), "setting": {"config": config, "steps": steps,
               "threads_per_rank": 1}, "rows": rows, "partition_balance": balance, "wall_s": time.time() - t_all}
    report.write_outputs(out_dir, "scaling", payload, text)
    fig, (ax,) = report.new_figure(1)
    ok = [r for r in rows if "error" not in r]
    ax.bar(range(len(ok)), [r["tokens_per_s"] for r in ok])
    ax.set_xticks(range(len(ok)))
    ax.set_xticklabels([f"dp{r['dp']}tp{r['tp']}pp{r['pp']}" for r in ok], fontsize=8)
    ax.set_ylabel("tokens/s (all ranks, 1 thread each)")
    report.save_figure(fig, f"{out_dir}/scaling.png")
    log(text)
    return 0

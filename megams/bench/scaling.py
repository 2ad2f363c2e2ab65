"""Study 4: tokens/s, peak memory per rank and the communication share of a step across dp / tp / pp
layouts at 2 and 4 ranks (real trainer under torchrun, gloo, 1 thread per rank, with
`logging.comm_timing=true`: every collective timed, megams' and DeepSpeed's, see
megams.training.comm_timing), the pipeline partition's cost balance (cost-balanced vs
uniform-by-layers, computed from `megams.parallel.partition`), and what the measured volumes predict
on one 8-GPU node. A layout the current build refuses is reported with its error line, not hidden.

The 8-GPU prediction is a model, not a measurement (`predict_step`): per rank and step,
    comm    = sum over collectives in a group of n > 1 of  latency + wire bytes / link bandwidth
    compute = the step's model FLOPs / ranks / GPU throughput
    share   = comm / (comm + compute)           (no overlap of the two: an upper bound on the share)
with the wire bytes measured here (ring algorithms: all-reduce 2(n-1)/n of the tensor, all-gather /
reduce-scatter (n-1)/n of the full tensor, send / recv the tensor) and the slowest rank's comm. Two
placements: the layout as measured on as many GPUs of the node (NVSwitch: each GPU has its full link
bandwidth whatever its partners), and the node filled with data-parallel replicas of it
(dp' = 8 / (tp x pp), per-rank micro-batches unchanged): DeepSpeed's collectives over the
data-parallel group (group size = dp) then run over dp' ranks, with the ring factor of dp'.
Defaults (`NODE`): H100 SXM, NVLink 4 at 300 GB/s per direction as all-reduce bus bandwidth (of 450
GB/s raw; what NCCL's all-reduce reaches is 350-480), 10 us per collective, 400 TFLOP/s achieved
(40% of bf16 dense peak).
"""
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
LAYOUTS = [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (1, 2, 2), (4, 1, 1)]  # (dp, tp, pp)
NODE = {"gpus": 8, "link_GBps": 300.0, "latency_us": 10.0, "gpu_tflops": 400.0}
_P2P = ("send", "recv", "broadcast", "barrier")


def _op_key(key: str):
    """"ds:all_reduce@2" -> ("ds", "all_reduce", 2)."""
    src, _, rest = key.rpartition(":")
    op, _, n = rest.rpartition("@")
    return src, op, int(n)


def predict_step(comm_ops: dict, flops_per_rank: float, node: dict = NODE, dp: int = 1, dp_to: int = 0) -> dict:
    """The model above for one rank's step: `comm_ops` as in metrics.jsonl (op@n -> calls, bytes,
    wire_bytes); `dp_to`: DeepSpeed's collectives over the data-parallel group (n = dp) re-costed over
    dp_to ranks (0: as measured)."""
    from megams.training.comm_timing import wire_bytes
    bw, lat = node["link_GBps"] * 1e9, node["latency_us"] * 1e-6
    comm = wire_total = 0.0
    for key, r in comm_ops.items():
        src, op, n = _op_key(key)
        wire = r["wire_bytes"]
        if dp_to and src == "ds" and n == dp and not any(k in op for k in _P2P):
            n, wire = dp_to, wire_bytes(op, r["bytes"], dp_to)
        if n > 1:
            comm += r["calls"] * lat + wire / bw
            wire_total += wire
    compute = flops_per_rank / (node["gpu_tflops"] * 1e12)
    return {"comm_s": comm, "compute_s": compute, "wire_bytes": wire_total,
            "share": comm / (comm + compute) if comm + compute > 0 else 0.0}


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


def run_layout(dp: int, tp: int, pp: int, out_dir: str, steps: int, config: str, timeout: float = 300,
               node: dict = NODE) -> dict:
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
            "--set", "logging.progress_bar=false", "--set", "logging.interval=1", "--set", "logging.comm_timing=true"]
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
    return {**row, **summarize(recs, dp, tp, pp, node)}


def summarize(recs: list, dp: int, tp: int, pp: int, node: dict = NODE) -> dict:
    """One layout's row from its metrics.jsonl step records (logging.comm_timing on): medians over the
    steps after the first 3 (warm-up), per rank where the record has every rank's values."""
    timed = recs[min(3, len(recs) - 1):]
    med = statistics.median
    n = len(timed[0]["ranks"])
    row = {"tokens_per_s": med(r["tokens_per_s"] for r in timed),
           "step_time_s": med(r["step_time_s"] for r in timed),
           "peak_rss_per_rank_bytes": [max(r["ranks"][i]["peak_mem_bytes"] for r in recs) for i in range(n)],
           "comm_s_per_rank": [med(r["ranks"][i]["comm_s"] for r in timed) for i in range(n)],
           "comm_share_per_rank": [med(r["ranks"][i]["comm_s"] / r["ranks"][i]["step_time_s"] for r in timed)
                                   for i in range(n)]}
    row["peak_rss_max_bytes"] = max(row["peak_rss_per_rank_bytes"])
    row["comm_s"] = max(row["comm_s_per_rank"])
    row["comm_share"] = max(row["comm_share_per_rank"])
    flops_per_rank = med(r["tflops"] * 1e12 * r["step_time_s"] for r in timed)  # the model's FLOPs / step / rank
    row["flops_per_rank_step"] = flops_per_rank
    row["wire_bytes_per_rank"] = [med(sum(o["wire_bytes"] for o in r["ranks"][i]["comm_ops"].values()) for r in timed)
                                  for i in range(n)]
    dp_to = node["gpus"] // (tp * pp)
    for name, to in (("node_same", 0), ("node_filled", dp_to)):
        per_rank = []
        for i in range(n):
            preds = [predict_step(r["ranks"][i]["comm_ops"], flops_per_rank, node, dp, to) for r in timed]
            per_rank.append(min(preds, key=lambda p: p["comm_s"]))  # volumes are equal step to step; calls too
        slowest = max(per_rank, key=lambda p: p["comm_s"])
        row[name] = slowest
    row["node_filled_layout"] = f"dp{dp_to}tp{tp}pp{pp}"
    return row


def _mib_list(r) -> str:
    return " / ".join(f"{b / report.MiB:.0f}" for b in r["peak_rss_per_rank_bytes"])


def node_paragraph(rows: list, node: dict = NODE) -> str:
    """What the measured volumes predict for one node of `node["gpus"]` GPUs, in words (from the rows)."""
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return ""
    lines = ["Measured comm time is wall time inside the collectives on each rank: it includes waiting for a "
             "slower peer (two cores shared by up to 4 ranks, pipeline bubbles), hence the spread over ranks; "
             "the least-waiting rank is the closer bound on the transfers themselves.", "",
             f"Model, not a measurement: one node of {node['gpus']} GPUs at {node['link_GBps']:.0f} GB/s per "
             f"GPU and direction (all-reduce bus bandwidth), {node['latency_us']:.0f} us per collective, "
             f"{node['gpu_tflops']:.0f} TFLOP/s achieved per GPU, no overlap of communication with compute; "
             "volumes and call counts as measured above (the slowest rank)."]
    for r in ok:
        a, b = r["node_same"], r["node_filled"]
        lat = b["comm_s"] - b["wire_bytes"] / (node["link_GBps"] * 1e9)
        lines.append(f"- dp{r['dp']}tp{r['tp']}pp{r['pp']}: {max(r['wire_bytes_per_rank']) / 2**20:.2f} MiB "
                     f"on the wire per rank and step, {r['flops_per_rank_step'] / 1e9:.2f} GFLOP per rank: on "
                     f"{r['ranks']} GPUs comm {a['comm_s'] * 1e3:.3f} ms vs compute {a['compute_s'] * 1e3:.3f} ms "
                     f"(share {a['share']:.0%}); filled to {r['node_filled_layout']}: comm {b['comm_s'] * 1e3:.3f} ms "
                     f"({lat * 1e3:.3f} ms of it per-call latency), share {b['share']:.0%}.")
    lines.append("Where the per-call latency is most of the predicted communication, the share is set by the "
                 "number of collectives per step, not by bandwidth: compute grows as d^2 x tokens per rank, wire "
                 "bytes as d x tokens (tensor parallelism) or d^2 (data parallelism), calls not at all, so wider "
                 "models and longer micro-batches lower the share.")
    return "\n".join(lines)


def run(out_dir: str, threads: int = 1, steps: int = 8, config: str = "", layouts=None, log=print,
        node: dict = NODE) -> int:
    config = config or os.path.join(ROOT, "configs", "tiny", "vanilla.yaml")
    t_all = time.time()
    balance = partition_balance()
    rows = []
    for dp, tp, pp in (LAYOUTS if layouts is None else layouts):
        r = run_layout(dp, tp, pp, out_dir, steps, config, node=node)
        rows.append(r)
        log(f"[scaling] dp={dp} tp={tp} pp={pp}: " + (f"error: {r['error']}" if "error" in r else
                                                      f"{r['tokens_per_s']:.0f} tok/s, step {r['step_time_s'] * 1e3:.0f} ms, "
                                                      f"comm {r['comm_share']:.0%}, peak RSS per rank {_mib_list(r)} MiB"))
    ok = lambda f: (lambda r: f(r) if "error" not in r else None)  # noqa: E731
    cols = [("dp", lambda r: r["dp"]), ("tp", lambda r: r["tp"]), ("pp", lambda r: r["pp"]),
            ("ranks", lambda r: r["ranks"]), ("tokens/s", lambda r: r.get("tokens_per_s")),
            ("step ms", ok(lambda r: r["step_time_s"] * 1e3)),
            ("comm ms/step per rank", ok(lambda r: " / ".join(f"{c * 1e3:.0f}" for c in r["comm_s_per_rank"]))),
            ("comm share, min-max rank", ok(lambda r: f"{min(r['comm_share_per_rank']):.0%}-{r['comm_share']:.0%}")),
            ("peak RSS MiB, max", ok(lambda r: r["peak_rss_max_bytes"] / report.MiB)),
            ("peak RSS MiB per rank", ok(_mib_list)),
            ("wire KiB/step/rank (max)", ok(lambda r: max(r["wire_bytes_per_rank"]) / 1024)),
            (f"model: comm share, same layout on {node['gpus']}-GPU node", ok(lambda r: f"{r['node_same']['share']:.0%}")),
            ("model: node filled by dp", ok(lambda r: f"{r['node_filled_layout']}: {r['node_filled']['share']:.0%}")),
            ("note", lambda r: r.get("error", ""))]
    bcols = [("config", lambda r: f"configs/tiny/{r['config']}.yaml"), ("stages", lambda r: r["stages"]),
             ("slowest/mean stage, cost-balanced", lambda r: r["cost"]),
             ("slowest/mean stage, uniform by layers", lambda r: r["uniform"])]
    text = (report.table(rows, cols) + "\n\n" + node_paragraph(rows, node)
            + "\n\nPipeline partition balance (FLOPs):\n\n" + report.table(balance, bcols))
    payload = {"study": "scaling", "machine": report.machine(), "setting": {"config": config, "steps": steps,
               "threads_per_rank": 1, "comm_timing": True, "node_model": node}, "rows": rows,
               "partition_balance": balance, "wall_s": time.time() - t_all}
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

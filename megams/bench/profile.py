"""Study 7: where a training step's time goes. torch.profiler over a few steps of vanilla and
bottom-up (the throughput study's shapes), each with a model option off ("before") and on ("after"),
side by side in one run, fresh process per row: the top operators by self time, per step.

    python tools/benchmark.py profile [--size d512] [--option fused_qkv]
"""
from __future__ import annotations

import time
from typing import List

from megams.bench import report
from megams.bench.runner import run_fresh
from megams.bench.throughput import SIZES, model_for


def run(out_dir: str, size: str = "d512", models=("vanilla", "bottom_up"), option: str = "fused_qkv",
        seq_len: int = 256, batch: int = 4, steps: int = 6, profile_steps: int = 4, top: int = 10,
        threads: int = 2, runner=run_fresh, log=print) -> dict:
    d, h, L = SIZES[size]
    rows: List[dict] = []
    t_all = time.time()
    for m in models:
        for on in (False, True):
            label = f"{m} {size} {option}={on}"
            spec = {"label": label, "model": {**model_for(m, d, h, L), option: on}, "seq_len": seq_len,
                    "batch": batch, "steps": steps, "timed_skip": 2, "threads": threads,
                    "measure_activations": False, "data_path": None, "profile_steps": profile_steps,
                    "profile_top": top}
            r = runner(spec)
            r.update({"model": m, "size": size, "option": option, "on": on})
            r.pop("loss_curve", None)
            rows.append(r)
            log(f"[profile] {label}: {r['tokens_per_s']:.0f} tok/s unprofiled, profiled step "
                f"{r['profile']['step_s'] * 1e3:.0f} ms")
    text = _tables(rows, top)
    payload = {"study": "profile", "machine": report.machine(),
               "setting": {"size": size, "seq_len": seq_len, "batch": batch, "timed_steps": steps - 2,
                           "profile_steps": profile_steps, "threads": threads, "option": option},
               "rows": rows, "wall_s": time.time() - t_all}
    report.write_outputs(out_dir, "profile", payload, text)
    log(text)
    return payload


def _tables(rows: List[dict], top: int) -> str:
    """One table per row: its top ops (name, ms per step, share of the profiled self time, calls)."""
    parts = []
    summary = [("row", lambda r: r["label"]), ("tokens/s", lambda r: r["tokens_per_s"]),
               ("step ms (unprofiled median)", lambda r: r["step_time_s"] * 1e3),
               ("step ms (profiled)", lambda r: r["profile"]["step_s"] * 1e3)]
    parts.append(report.table(rows, summary))
    for r in rows:
        ops = r["profile"]["top"][:top]
        cols = [("op", lambda o: o["op"]), ("self ms/step", lambda o: o["self_ms"]),
                ("share", lambda o: f"{o['share']:.1%}"), ("calls/step", lambda o: o["calls"])]
        parts.append(f"**{r['label']}** (top {len(ops)} by self {'device' if 'device' in r['profile']['by'] else 'CPU'}"
                     f" time)\n\n" + report.table(ops, cols))
    return "\n\n".join(parts)

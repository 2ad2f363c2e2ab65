#!/usr/bin/env python
"""The checks and the report of tools/gpu_check.sh (plain Python, no GPU needed).

    gpu_check_verify.py metrics RUN_DIR STEPS          # the run reached STEPS, finite losses, a val_loss
    gpu_check_verify.py resumed LOG RUN_DIR STEPS      # the log says it resumed; metrics reach STEPS
    gpu_check_verify.py loss_equal EVAL_JSON RUN_DIR TOL   # evaluate.py's loss == the run's last val_loss
    gpu_check_verify.py mfu BENCH_JSON                 # benchmark_gpu.py's report has an MFU in (0, 1)
    gpu_check_verify.py overrides FILE                 # every config|override|... line loads (dry run)
    gpu_check_verify.py report STEPS_JSONL MD JSON [BENCH_JSON]
Exit 0 when the check passes; the last line printed is the detail recorded in the table.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _metrics(run_dir: str) -> list:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"FAILED: no {path}")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def metrics(run_dir: str, steps: str) -> str:
    recs = _metrics(run_dir)
    train = [r for r in recs if "loss" in r and r.get("loss") is not None]
    evals = [r for r in recs if "val_loss" in r]
    last = max((r.get("step", 0) for r in recs), default=0)
    if last < int(steps):
        raise SystemExit(f"FAILED: metrics end at step {last}, expected {steps}")
    bad = [r["step"] for r in train if not math.isfinite(float(r["loss"]))]
    if bad or not train:
        raise SystemExit(f"FAILED: non-finite or missing training losses at steps {bad[:5]}")
    if not evals:
        raise SystemExit("FAILED: no val_loss recorded")
    return f"step {last}: loss {float(train[-1]['loss']):.4f}, val_loss {evals[-1]['val_loss']:.4f}"


def resumed(log: str, run_dir: str, steps: str) -> str:
    with open(log, errors="replace") as f:
        text = f.read()
    if "[megams] resumed from" not in text:
        raise SystemExit("FAILED: the second run did not resume from a checkpoint")
    return "resumed; " + metrics(run_dir, steps)


def loss_equal(eval_json: str, run_dir: str, tol: str) -> str:
    with open(eval_json) as f:
        got = json.load(f)["loss"]
    evals = [r for r in _metrics(run_dir) if "val_loss" in r]  # the end-of-run evaluation
    want = evals[-1]["val_loss"] if evals else float("nan")
    ok = abs(got - want) <= float(tol) * max(1.0, abs(want))
    detail = f"converted model loss {got:.5f} vs trainer val_loss {want:.5f} (tol {tol})"
    if not ok:
        raise SystemExit("FAILED: " + detail)
    return detail


def mfu(bench_json: str) -> str:
    with open(bench_json) as f:
        rep = json.load(f)
    rows = rep.get("rows", [])
    if not rows or not all(0 < r["mfu"] < 1 for r in rows):
        raise SystemExit(f"FAILED: no plausible MFU in {bench_json}")
    r = rows[0]
    return (f"{r['model']} d={r['d_model']} {r['params'] / 1e6:.0f}M: {r['tokens_per_s_per_gpu']:.0f} tok/s, "
            f"{r['tflops_per_gpu']:.1f} TFLOP/s, MFU {r['mfu']:.1%} of {rep['peak_flops'] / 1e12:.0f} TFLOP/s "
            f"({rep['peak_source']})")


def overrides(path: str) -> str:
    import importlib.util
    from megams.config import load_config
    for mod in ("deepspeed.launcher.runner", "torch.distributed.run"):  # the launchers the script runs
        if importlib.util.find_spec(mod) is None:
            raise SystemExit(f"FAILED: python -m {mod}: no such module")
    n = 0
    with open(path) as f:
        for line in f:
            parts = line.strip().split("|")
            if not parts[0]:
                continue
            load_config(os.path.join(ROOT, parts[0]), parts[1:])
            n += 1
    return f"{n} pretrain configurations load"


def report(steps_jsonl: str, md: str, out_json: str, bench_json: str = "") -> str:
    with open(steps_jsonl) as f:
        steps = [json.loads(line) for line in f if line.strip()]
    device = None
    try:
        import torch
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
        versions = {"torch": torch.__version__, "cuda": torch.version.cuda}
    except Exception:
        versions = {}
    passed = sum(s["rc"] == 0 for s in steps)
    lines = [f"GPU check on {device} ({versions}): {passed}/{len(steps)} passed, "
             f"{sum(s['seconds'] for s in steps):.0f} s", "",
             "| step | result | s | detail |", "|---|---|---|---|"]
    for s in steps:
        res = "ok" if s["rc"] == 0 else ("skipped" if s["rc"] == 124 else f"FAIL ({s['rc']})")
        lines.append(f"| {s['step']} | {res} | {s['seconds']:.0f} | {s['detail'].replace('|', '/')} |")
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    bench = None
    if bench_json and os.path.exists(bench_json):
        with open(bench_json) as f:
            bench = json.load(f)
    with open(out_json, "w") as f:
        json.dump({"device": device, **versions, "passed": passed, "total": len(steps), "steps": steps,
                   "benchmark": bench}, f, indent=1)
    print("\n".join(lines))
    if passed != len(steps):
        raise SystemExit(f"{len(steps) - passed} step(s) failed or skipped: see {md}")
    return f"wrote {md} and {out_json}"


CHECKS = {"metrics": metrics, "resumed": resumed, "loss_equal": loss_equal, "mfu": mfu, "overrides": overrides,
          "report": report}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in CHECKS:
        print(f"usage: gpu_check_verify.py {{{'|'.join(CHECKS)}}} ARGS...", file=sys.stderr)
        sys.exit(2)
    try:
        print(CHECKS[sys.argv[1]](*sys.argv[2:]))
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code)
            sys.exit(1)
        raise

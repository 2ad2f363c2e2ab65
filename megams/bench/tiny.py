"""Study 5, the foundation table: each configs/tiny/*.yaml trained through the real trainer
(launch/pretrain.py: DeepSpeed engine, metrics.jsonl) on a text corpus, one fresh process each."""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import List, Optional

from megams.bench import report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FOUNDATION = ("vanilla", "bottom_up", "top_down", "retina")  # the four foundation configs (others: --configs)


def run(corpus: str, out_dir: str, steps: int = 300, configs: Optional[List[str]] = None, threads: int = 2,
        extra: Optional[List[str]] = None, log=print) -> dict:
    configs = configs or [os.path.join(ROOT, "configs", "tiny", f"{n}.yaml") for n in FOUNDATION]
    t_all = time.time()
    rows = []
    for path in configs:
        name = os.path.splitext(os.path.basename(path))[0]
        run_dir = os.path.abspath(os.path.join(out_dir, "runs", name))
        shutil.rmtree(run_dir, ignore_errors=True)
        argv = [sys.executable, os.path.join(ROOT, "launch", "pretrain.py"), "--config", path,
                "--set", f"training.max_steps={steps}", "--set", f"data.path={os.path.abspath(corpus)}",
                "--set", "data.split=[0.9,0.1,0.0]", "--set", f"training.run_dir={run_dir}",
                "--set", f"training.eval_interval={steps}", "--set", "checkpoint.interval=0",
                "--set", "logging.progress_bar=false", "--set", "logging.interval=1", *(extra or [])]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT, DS_ACCELERATOR="cpu")
        env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".venv", "torch_extensions"))
        t0 = time.time()
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"tiny/{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        recs = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
        steps_recs = [r for r in recs if "tokens_per_s" in r]
        ev = [r for r in recs if "val_loss" in r][-1]
        params = next((int(line.split(": ", 1)[1].split(" params")[0].replace(",", ""))
                       for line in proc.stdout.splitlines() + proc.stderr.splitlines()
                       if "params," in line and "[megams]" in line), None)
        timed = steps_recs[min(5, len(steps_recs) - 1):]
        row = {"config": f"configs/tiny/{name}.yaml", "name": name, "params": params, "steps": steps,
               "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
               "peak_rss_bytes": max(r["peak_mem_bytes"] for r in steps_recs),
               "final_train_loss": statistics.mean(r["loss"] for r in steps_recs[-10:]),
               "val_loss": ev["val_loss"], "val_ppl": ev["val_ppl"], "val_bpb": ev["val_bpb"],
               "wall_s": time.time() - t0}
        rows.append(row)
        log(f"[tiny] {name}: val ppl {row['val_ppl']:.3f}, {row['tokens_per_s']:.0f} tok/s ({row['wall_s']:.0f} s)")
    cols = [("config", lambda r: r["config"]), ("params", lambda r: r["params"]),
            ("tokens/s", lambda r: r["tokens_per_s"]), ("peak RSS MiB", lambda r: r["peak_rss_bytes"] / report.MiB),
            ("train loss", lambda r: r["final_train_loss"]), ("val ppl", lambda r: r["val_ppl"]),
            ("val bits/byte", lambda r: r["val_bpb"])]
    text = report.table(rows, cols)
    payload = {"study": "tiny", "machine": report.machine(),
               "setting": {"corpus": corpus, "steps": steps, "threads": threads, "extra": extra or []},
               "rows": rows, "wall_s": time.time() - t_all}
    report.write_outputs(out_dir, "tiny", payload, text)
    plot(rows, f"{out_dir}/tiny.png")
    log(text)
    return payload


def plot(rows, path):
    fig, (ax,) = report.new_figure(1, width=5.5)
    for r in rows:
        ax.scatter([r["tokens_per_s"]], [r["val_ppl"]])
        ax.annotate(r["name"], (r["tokens_per_s"], r["val_ppl"]), fontsize=8, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("tokens/s (trainer, 2 CPU threads)")
    ax.set_ylabel("validation perplexity")
    ax.grid(alpha=0.3)
    report.save_figure(fig, path)

"""Tokens/s of a config's training step with the background prefetcher off and on, side by side.

    python tools/benchmark.py prefetch [--config configs/tiny/bottom_up.yaml] [--steps 12] [--rounds 3]

The same global batches (megams.data.batches.GlobalBatches over the config's data, the trainer's input
pipeline) feed the same model (forward, backward, AdamW step per global batch, micro-batches
accumulated) through megams.training.prefetch.Prefetcher at each --depths value (0 = off: every
step's batches built in the loop). Rounds alternate the depths so that drift on a shared machine hits
both alike; the table reports the median tokens/s over rounds, and the time the loop spends building
a step's batches when it builds them itself (what prefetching can hide at best).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Sequence


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def run(config: str, out: str, steps: int = 12, rounds: int = 3, depths: Sequence[int] = (0, 2),
        threads: int = 2, device: str = "cpu", overrides: Sequence[str] = ()) -> dict:
    import torch
    import torch.nn.functional as F

    from megams.config import load_config
    from megams.data import build_data
    from megams.data.batches import GlobalBatches
    from megams.models import build_model
    from megams.training.prefetch import Prefetcher

    torch.set_num_threads(threads)
    cfg = load_config(config, list(overrides))
    t, seq = cfg.training, cfg.data.seq_len
    bundle = build_data(cfg.data, seq, t.seed, progress=False)
    train = GlobalBatches(bundle.train, seq, t.global_batch_size, t.micro_batch_size, 0, 1)
    model = build_model(cfg.model, seed=t.seed).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr, fused=device.startswith("cuda") or None)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    tokens_per_step = t.global_batch_size * seq

    def source(n):
        for _ in range(n):
            yield train.next()

    def measure(depth: int) -> float:
        train.consumed_samples = 0  # the same batches for every depth
        with Prefetcher(source(steps + 1), device, depth=depth) as batches:
            for i, step_batches in enumerate(batches):
                if i == 1:  # the first step (and the prefetcher's start-up) untimed
                    sync()
                    t0 = time.perf_counter()
                for inputs, targets in step_batches:
                    logits = model(inputs)
                    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
                    (loss / len(step_batches)).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            sync()
        return steps * tokens_per_step / (time.perf_counter() - t0)

    train.consumed_samples = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        train.next()
    build_s = (time.perf_counter() - t0) / steps

    per_depth = {d: [] for d in depths}
    for r in range(rounds):
        order = list(depths) if r % 2 == 0 else list(reversed(depths))
        for d in order:
            per_depth[d].append(measure(d))
    rows = [{"prefetch": d, "tokens_per_s": statistics.median(v), "rounds": v} for d, v in per_depth.items()]
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["vs_off"] = row["tokens_per_s"] / base
    machine = torch.cuda.get_device_name() if device.startswith("cuda") else _cpu_name()
    report = {"config": config, "overrides": list(overrides), "device": device, "machine": machine,
              "threads": threads, "steps": steps, "rounds": rounds, "tokens_per_step": tokens_per_step,
              "batch_build_s_per_step": build_s, "rows": rows, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M")}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "prefetch.json"), "w") as f:
        json.dump(report, f, indent=1)
    table = markdown(report)
    with open(os.path.join(out, "prefetch.md"), "w") as f:
        f.write(table + "\n")
    print(table, flush=True)
    return report


def markdown(report: dict) -> str:
    lines = [f"{report['config']} on {report['device']} ({report['machine']}, {report['threads']} threads), "
             f"{report['steps']} timed steps x {report['rounds']} rounds, {report['tokens_per_step']} tokens/step; "
             f"building one step's batches in the loop: {report['batch_build_s_per_step'] * 1e3:.2f} ms",
             "", "| data.prefetch | tokens/s (median) | vs off | per round |", "|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['prefetch']} | {r['tokens_per_s']:.0f} | {r['vs_off']:.3f} | "
                     + ", ".join(f"{x:.0f}" for x in r["rounds"]) + " |")
    return "\n".join(lines)

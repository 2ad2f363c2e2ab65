"""Study 2: tokens/s, achieved TFLOP/s and MFU per model and size, fp32 / bf16, eager / compiled,
with / without activation checkpointing. MFU is against the matmul peak measured in the same run
(`measure_matmul_flops`, same threads), per precision. FLOPs are the model's useful matmul FLOPs
from `megams.models.cost` (recomputation under checkpointing is not counted as useful)."""
from __future__ import annotations

import time
from typing import Dict, List, Optional

import torch

from megams.bench import report
from megams.bench.runner import run_spec
from megams.training.mfu import measure_matmul_flops

SIZES = {  # name: (d_model, heads, vanilla layers)
    "d128": (128, 4, 4),   # the tiny configs' width (configs/tiny/vanilla.yaml's shape)
    "d256": (256, 4, 4),
    "d512": (512, 8, 4),
    "d768": (768, 12, 4),
}


def model_for(kind: str, d: int, heads: int, L: int) -> dict:
    c = {"d_model": d, "n_heads": heads, "vocab_size": 256}
    if kind == "vanilla":
        return {"type": "vanilla", "n_layers": L, **c}
    if kind == "bottom_up":  # 2L layers at about the vanilla's cost (the tiny config's shape)
        return {"type": "bottom_up", "shorten_factors": [4, 4], "layers_per_scale": [1, L // 2, 2 * L - 2 - L // 2],
                "n_post": 1, "pooling": "linear", "aggregation": "sum", "upsampling": "linear", **c}
    if kind == "top_down":
        return {"type": "top_down", "shorten_factors": [4, 4], "layers_per_scale": [max(1, L // 4), L // 2, L],
                "pooling": "linear", **c}
    if kind == "retina":
        return {"type": "retina", "n_layers": L, "retina_factors": [4, 16], "retina_windows": [16, 4, 4], **c}
    raise ValueError(kind)


def default_grid(sizes=("d256", "d512"), models=("vanilla", "bottom_up", "top_down", "retina"),
                 big="d768", options_size="d512") -> List[dict]:
    """Every model x size x precision eagerly; vanilla alone at `big`; at `options_size`
    torch.compile and activation checkpointing for vanilla (both precisions) and bottom-up (bf16)."""
    grid = []
    for s in sizes:
        for m in models:
            for p in ("fp32", "bf16"):
                grid.append({"model": m, "size": s, "precision": p, "compile": False, "ac": False})
    if big:
        for p in ("fp32", "bf16"):
            grid.append({"model": "vanilla", "size": big, "precision": p, "compile": False, "ac": False})
    if options_size:
        for m, precisions in (("vanilla", ("fp32", "bf16")), ("bottom_up", ("bf16",))):
            for p in precisions:
                for comp, ac in ((True, False), (False, True)):
                    grid.append({"model": m, "size": options_size, "precision": p, "compile": comp, "ac": ac})
    return grid


def compile_grid(sizes=("d128",), models=("vanilla", "bottom_up"), precisions=("fp32", "bf16")) -> List[dict]:
    """Eager and compiled (training.compile's path: torch.compile per Block, megams.bench.runner.
    apply_block_compile) side by side, no checkpointing."""
    return [{"model": m, "size": s, "precision": p, "compile": comp, "ac": False}
            for s in sizes for m in models for p in precisions for comp in (False, True)]


def run(out_dir: str, grid: Optional[List[dict]] = None, seq_len: int = 256, batch: int = 4, steps: int = 4,
        threads: int = 2, peak_n: int = 2048, peak_seconds: float = 1.5, sizes: Optional[Dict] = None,
        log=print) -> dict:
    torch.set_num_threads(threads)
    sizes = sizes or SIZES
    grid = grid if grid is not None else default_grid()
    t_all = time.time()
    peaks = {"fp32": measure_matmul_flops(torch.float32, peak_n, seconds=peak_seconds),
             "bf16": measure_matmul_flops(torch.bfloat16, peak_n, seconds=peak_seconds)}
    log(f"[throughput] measured matmul peak ({peak_n}^3, {threads} threads): fp32 {peaks['fp32'] / 1e9:.0f} "
        f"GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s (re-measured before every row and at the end; MFU uses "
        "the best)")
    rows = []
    peaks_start = dict(peaks)
    for g in grid:
        d, h, L = sizes[g["size"]]
        label = f"{g['model']} {g['size']}"
        spec = {"label": label, "model": model_for(g["model"], d, h, L), "seq_len": seq_len, "batch": batch,
                "steps": steps + (3 if g["compile"] else 2), "timed_skip": 3 if g["compile"] else 2,
                "precision": g["precision"], "compile": g["compile"], "ac": g["ac"], "threads": threads,
                "measure_activations": False, "data_path": None}
        # a shared machine only ever makes a measured peak too low: re-measure and keep the best
        dt = torch.float32 if g["precision"] == "fp32" else torch.bfloat16
        peaks[g["precision"]] = max(peaks[g["precision"]], measure_matmul_flops(dt, peak_n, seconds=peak_seconds / 3))
        t0 = time.time()
        if g["compile"]:
            torch._dynamo.reset()
        r = run_spec(spec)
        r.update(g)
        r.pop("loss_curve", None)
        r["wall_s"] = time.time() - t0
        rows.append(r)
        log(f"[throughput] {label} {g['precision']} compile={g['compile']} ac={g['ac']}: "
            f"{r['tokens_per_s']:.0f} tok/s, {r['tflops'] * 1e3:.1f} GFLOP/s, "
            f"MFU {r['tflops'] * 1e12 / peaks[g['precision']]:.1%} of the best peak so far ({r['wall_s']:.0f} s)")
    peaks_end = {"fp32": measure_matmul_flops(torch.float32, peak_n, seconds=peak_seconds),
                 "bf16": measure_matmul_flops(torch.bfloat16, peak_n, seconds=peak_seconds)}
    peaks = {k: max(peaks[k], peaks_end[k]) for k in peaks}
    for r in rows:
        r["mfu"] = r["tflops"] * 1e12 / peaks[r["precision"]]
    cols = [("model", lambda r: r["model"]), ("size", lambda r: r["size"]), ("params", lambda r: r["params"]),
            ("precision", lambda r: r["precision"]), ("compile", lambda r: r["compile"]), ("act. ckpt", lambda r: r["ac"]),
            ("tokens/s", lambda r: r["tokens_per_s"]), ("GFLOP/s", lambda r: r["tflops"] * 1e3),
            ("MFU", lambda r: f"{r['mfu']:.1%}")]
    text = (f"Measured matmul peak ({peak_n}x{peak_n}x{peak_n}, {threads} threads, best of {len(rows) + 2} "
            f"measurements in this run): fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} "
            "GFLOP/s\n\n" + report.table(rows, cols))
    setting = {"seq_len": seq_len, "batch": batch, "timed_steps": steps, "threads": threads, "sizes": sizes}
    payload = {"study": "throughput", "machine": report.machine(), "setting": setting, "peak_flops": peaks,
               "peak_flops_start": peaks_start, "peak_flops_end": peaks_end,
               "rows": rows, "wall_s": time.time() - t_all}
    report.write_outputs(out_dir, "throughput", payload, text)
    plot(rows, f"{out_dir}/throughput.png")
    log(text)
    return payload


def plot(rows: List[dict], path: str) -> None:
    fig, (ax,) = report.new_figure(1, width=8.0)
    labels = [f"{r['model']} {r['size']} {r['precision']}{' C' if r['compile'] else ''}{' AC' if r['ac'] else ''}"
              for r in rows]
    ax.barh(range(len(rows)), [100 * r["mfu"] for r in rows],
            color=["tab:blue" if r["precision"] == "fp32" else "tab:orange" for r in rows])
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("MFU (% of measured matmul peak, same precision; C = compiled, AC = checkpointed)")
    ax.grid(axis="x", alpha=0.3)
    report.save_figure(fig, path)

"""Study 1, the paper's claim: validation perplexity against memory, at equal tokens and width.

Models (width d, heads h, vanilla depth L):
  vanilla-L, vanilla-L/2                           the baselines
  bottom-up naive       2L layers: 1 + (L - 2) @ n/4 + L @ n/16 + 1, avg pooling, sum, repeat
  bottom-up (tuned)     2L layers: 0 + (2L - 3) @ n/16 + 3 (one coarse scale, 3 full-resolution layers
                        after it); linear pooling, sum aggregation, linear upsampling (docs/RESULTS.md)
  top-down              2L layers: n_0 = L/4, n_1 = 3L/8, the rest at n/16, linear pooling
  retina                L/2 full-resolution layers, windows (16, 4, 4) over pools (4, 16)
Each model trains in a fresh process (its own peak RSS) on the same batches.
"""
from __future__ import annotations

import json
import time
from typing import Dict, List, Optional

from megams.bench import report
from megams.bench.runner import run_fresh


def default_models(d: int, heads: int, L: int) -> Dict[str, dict]:
    """The study's models at width d: two vanilla baselines, the naive bottom-up, the tuned
    bottom-up (one coarse scale at n/16, 3 full-resolution layers after it, linear pooling and
    upsampling, sum aggregation; chosen by the probes in docs/RESULTS.md), top-down and retina."""
    c = {"d_model": d, "n_heads": heads}
    lin = {"type": "bottom_up", "pooling": "linear", "aggregation": "sum", "upsampling": "linear", **c}
    td0, td1 = max(1, L // 4), max(1, 3 * L // 8)
    n = 2 * L
    return {
        f"vanilla-{L}": {"type": "vanilla", "n_layers": L, **c},
        f"vanilla-{L // 2}": {"type": "vanilla", "n_layers": L // 2, **c},
        f"bottom-up-{n} naive 1+{L - 2}@4+{L}@16+1": {
            "type": "bottom_up", "shorten_factors": [4, 4], "layers_per_scale": [1, L - 2, L], "n_post": 1,
            "pooling": "avg", "aggregation": "sum", "upsampling": "repeat", **c},
        f"bottom-up-{n} 0+{n - 3}@16+3": {**lin, "shorten_factors": [16], "layers_per_scale": [0, n - 3],
                                         "n_post": 3},
        f"top-down-{n}": {"type": "top_down", "shorten_factors": [4, 4], **c,
                          "layers_per_scale": [td0, td1, n - td0 - td1], "pooling": "linear"},
        f"retina-{L // 2}": {"type": "retina", "n_layers": L // 2, "retina_factors": [4, 16],
                             "retina_windows": [16, 4, 4], **c},
    }


def run(corpus: str, out_dir: str, d: int = 128, heads: int = 4, L: int = 8, seq_len: int = 256, batch: int = 8,
        steps: int = 1000, lr: float = 1e-3, eval_batches: int = 16, eval_every: int = 250, threads: int = 2,
        runner=run_fresh, data_cache: str = ".cache/megams-data", device: str = "cpu",
        models: Optional[Dict[str, dict]] = None, only: Optional[List[str]] = None, resume: bool = False,
        log=print) -> dict:
    """`resume`: keep the rows of an earlier run in `out_dir` with the same setting and model config
    (results are written after every model, so an interrupted or extended study continues)."""
    models = models or default_models(d, heads, L)
    if only:
        models = {k: v for k, v in models.items() if any(o in k for o in only)}
    setting = {"corpus": corpus, "d_model": d, "n_heads": heads, "L": L, "seq_len": seq_len, "batch": batch,
               "steps": steps, "tokens": steps * batch * seq_len, "lr": lr, "precision": "fp32",
               "threads": threads, "eval_batches": eval_batches, "device": device}
    earlier = _earlier_rows(out_dir, setting) if resume else {}
    rows = []
    t_all = time.time()
    for label, m in models.items():
        if label in earlier and earlier[label]["model_cfg"] == m:
            rows.append(earlier[label])
            log(f"[tradeoff] {label}: kept from the earlier run in {out_dir}")
            continue
        t0 = time.time()
        spec = {"label": label, "model": {"vocab_size": 256, **m}, "data_path": corpus, "seq_len": seq_len,
                "batch": batch, "steps": steps, "lr": lr, "eval_batches": eval_batches, "eval_every": eval_every,
                "threads": threads, "precision": "fp32", "data_cache": data_cache,
                "device": device}
        r = runner(spec)
        r["model_cfg"] = m
        r["wall_s"] = time.time() - t0
        rows.append(r)
        _save_partial(out_dir, setting, rows + [v for k, v in earlier.items() if k not in models])
        log(f"[tradeoff] {label}: val ppl {r.get('val_ppl', float('nan')):.3f} bpb {r.get('val_bpb', float('nan')):.3f} "
            f"act {r['act_bytes_per_seq'] / report.MiB:.2f} MiB/seq {r['tokens_per_s']:.0f} tok/s ({r['wall_s']:.0f} s)")
    base = next((r for r in rows if r["label"] == f"vanilla-{L // 2}"), rows[0])
    for r in rows:
        r["act_ratio"] = report.ratio(r["act_bytes_per_seq"], base["act_bytes_per_seq"])
    cols = columns(L)
    text = report.table(rows, cols)
    payload = {"study": "tradeoff", "machine": report.machine(), "setting": setting, "rows": rows,
               "wall_s": time.time() - t_all}
    report.write_outputs(out_dir, "tradeoff", payload, text)
    plot(rows, f"{out_dir}/tradeoff.png", setting)
    log(text)
    return payload


def columns(L: int):
    return [("model", lambda r: r["label"]), ("layers", lambda r: r["layers"]), ("params", lambda r: r["params"]),
            ("MFLOP/token", lambda r: r["flops_per_token"] / 1e6),
            ("act MiB/seq (saved)", lambda r: r["act_bytes_per_seq"] / report.MiB),
            (f"act vs vanilla-{L // 2}", lambda r: f"{r['act_ratio']:.2f}x"),
            ("act MiB/seq (cost model)", lambda r: r["act_bytes_per_seq_est"] / report.MiB),
            ("peak RSS MiB", lambda r: r["peak_rss_bytes"] / report.MiB),
            ("tokens/s", lambda r: r["tokens_per_s"]),
            ("val ppl", lambda r: f"{r['val_ppl']:.3f}" if r.get("val_ppl") else None),
            ("val bits/byte", lambda r: f"{r['val_bpb']:.3f}" if r.get("val_bpb") else None)]


def plot(rows: List[dict], path: str, setting: dict) -> None:
    """Left: perplexity vs activation memory (a model far above the rest is drawn at the top edge,
    its value in the label, so it does not squash the others). Right: validation bits/byte curves."""
    fig, (ax, ax2) = report.new_figure(2, width=5.6)
    ppl = sorted(r["val_ppl"] for r in rows if r.get("val_ppl"))
    top = ppl[0] * 1.12 if len(ppl) > 1 and ppl[-1] > ppl[0] * 1.12 else None
    for r in rows:
        x, y = r["act_bytes_per_seq"] / report.MiB, r.get("val_ppl")
        label = r["label"]
        if top and y > top:
            y, label = top, f"{label} (ppl {r['val_ppl']:.1f}, off scale)"
        ax.scatter([x], [y], s=40, marker="^" if label != r["label"] else "o")
        ax.annotate(label, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points", rotation=12)
        ev = r.get("evals") or []
        if ev:
            ax2.plot([e["step"] for e in ev], [e["val_bpb"] for e in ev], marker="o", ms=3, label=r["label"])
    if top:
        ax.set_ylim(ppl[0] * 0.98, top * 1.02)
        bpb = sorted(r["val_bpb"] for r in rows if r.get("val_bpb"))
        ax2.set_ylim(bpb[0] * 0.97, bpb[0] * 1.35)
    ax.set_xlabel("activation memory per sequence (MiB, saved for backward, fp32)")
    ax.set_ylabel("validation perplexity (bytes)")
    ax.set_title(f"equal tokens ({setting['tokens'] / 1e6:.1f}M), d={setting['d_model']}, T={setting['seq_len']}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax2.set_xlabel("step")
    ax2.set_ylabel("validation bits/byte")
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    report.save_figure(fig, path)


def _earlier_rows(out_dir: str, setting: dict) -> Dict[str, dict]:
    for name in ("tradeoff.json", "tradeoff.partial.json"):
        try:
            with open(f"{out_dir}/{name}") as f:
                old = json.load(f)
        except (OSError, ValueError):
            continue
        if old.get("setting") == setting:
            return {r["label"]: r for r in old["rows"]}
    return {}


def _save_partial(out_dir: str, setting: dict, rows: List[dict]) -> None:
    import os
    os.makedirs(out_dir, exist_ok=True)
    with open(f"{out_dir}/tradeoff.partial.json", "w") as f:
        json.dump({"setting": setting, "rows": rows}, f, indent=1)


def load_models(path: str) -> Dict[str, dict]:
    with open(path) as f:
        return json.load(f)

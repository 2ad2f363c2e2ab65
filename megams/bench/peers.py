"""Study 3: megams against its peers on the same shape, data, batch, sequence and steps:
  vanilla  vs Hugging Face transformers' GPT-2 (layernorm, GELU 4d MLP, learned positions, tied head)
  bottom-up (1 scale, avg pool, sum, repeat) vs hourglass-transformer-pytorch (naive resampling)
Each in a fresh process; tokens/s, peak RSS and saved-for-backward bytes, as megams / peer ratios.
Peers come from tools/requirements-bench.txt (installed only for benchmarks)."""
from __future__ import annotations

import time
from typing import List

from megams.bench import report
from megams.bench.runner import run_fresh


def pairs(d: int, heads: int, L: int, k: int, seq_len: int):
    """(label, megams model, peer impl, peer model) for the two comparisons (learned position
    tables sized to seq_len on both sides, as the peers size theirs)."""
    v = {"type": "vanilla", "n_layers": L, "d_model": d, "n_heads": heads, "vocab_size": 256,
         "positions": "learned", "max_seq_len": seq_len, "norm": "layernorm", "mlp": "gelu"}
    pre, post = max(1, L // 4), max(1, L // 4)
    valley = L - pre - post
    bu = {"type": "bottom_up", "shorten_factors": [k], "layers_per_scale": [pre, valley], "n_post": post,
          "d_model": d, "n_heads": heads, "vocab_size": 256, "positions": "learned", "max_seq_len": seq_len,
          "pooling": "avg",
          "aggregation": "sum", "upsampling": "repeat"}
    return [
        (f"vanilla {L}L d{d}", v, "gpt2", {"vocab_size": 256, "d_model": d, "n_heads": heads, "n_layers": L}),
        (f"bottom-up {pre}+{valley}@{k}+{post} d{d}", bu, "hourglass",
         {"vocab_size": 256, "d_model": d, "n_heads": heads, "depth": [pre, valley, post], "shorten_factor": k}),
    ]


def available() -> dict:
    out = {}
    for name, mod in (("gpt2", "transformers"), ("hourglass", "hourglass_transformer_pytorch")):
        try:
            __import__(mod)
            out[name] = True
        except ImportError:
            out[name] = False
    return out


def run(corpus: str, out_dir: str, d: int = 256, heads: int = 4, L: int = 4, k: int = 4, seq_len: int = 256,
        batch: int = 8, steps: int = 30, threads: int = 2, runner=run_fresh, data_cache: str = ".cache/megams-data",
        log=print) -> dict:
    have = available()
    t_all = time.time()
    rows = []
    common = {"data_path": corpus, "seq_len": seq_len, "batch": batch, "steps": steps, "threads": threads,
              "precision": "fp32", "timed_skip": 3, "eval_batches": 0,
              "data_cache": data_cache}
    for label, ours, impl, peer in pairs(d, heads, L, k, seq_len):
        if not have[impl]:
            log(f"[peers] {impl} not installed (pip install -r tools/requirements-bench.txt -c constraints.txt): skipped")
            continue
        a = runner({**common, "label": f"megams {label}", "impl": "megams", "model": ours})
        b = runner({**common, "label": f"{impl} {label}", "impl": impl, "model": peer})
        for r in (a, b):
            r.pop("loss_curve", None)
        row = {"shape": label, "peer": impl, "megams": a, "peer_result": b,
               "tok_ratio": a["tokens_per_s"] / b["tokens_per_s"],
               "rss_ratio": a["peak_rss_bytes"] / b["peak_rss_bytes"],
               "act_ratio": a["act_bytes_per_seq"] / b["act_bytes_per_seq"]}
        rows.append(row)
        log(f"[peers] {label}: megams {a['tokens_per_s']:.0f} tok/s vs {impl} {b['tokens_per_s']:.0f} "
            f"({row['tok_ratio']:.2f}x); saved bytes {row['act_ratio']:.2f}x; peak RSS {row['rss_ratio']:.2f}x")
    cols = [("shape", lambda r: r["shape"]), ("peer", lambda r: r["peer"]),
            ("params megams / peer", lambda r: f"{r['megams']['params'] / 1e6:.2f}M / {r['peer_result']['params'] / 1e6:.2f}M"),
            ("tokens/s megams", lambda r: r["megams"]["tokens_per_s"]),
            ("tokens/s peer", lambda r: r["peer_result"]["tokens_per_s"]),
            ("tokens/s ratio", lambda r: f"{r['tok_ratio']:.2f}x"),
            ("act MiB/seq megams", lambda r: r["megams"]["act_bytes_per_seq"] / report.MiB),
            ("act MiB/seq peer", lambda r: r["peer_result"]["act_bytes_per_seq"] / report.MiB),
            ("act ratio", lambda r: f"{r['act_ratio']:.2f}x"),
            ("peak RSS MiB megams", lambda r: r["megams"]["peak_rss_bytes"] / report.MiB),
            ("peak RSS MiB peer", lambda r: r["peer_result"]["peak_rss_bytes"] / report.MiB),
            ("RSS ratio", lambda r: f"{r['rss_ratio']:.2f}x")]
    text = report.table(rows, cols)
    setting = {"corpus": corpus, "d_model": d, "n_heads": heads, "L": L, "k": k, "seq_len": seq_len, "batch": batch,
               "steps": steps, "threads": threads, "precision": "fp32"}
    payload = {"study": "peers", "machine": report.machine(), "setting": setting, "rows": rows,
               "wall_s": time.time() - t_all}
    report.write_outputs(out_dir, "peers", payload, text)
    if rows:
        plot(rows, f"{out_dir}/peers.png")
    log(text)
    return payload


def plot(rows: List[dict], path: str) -> None:
    fig, (ax1, ax2) = report.new_figure(2, width=4.8)
    x = range(len(rows))
    w = 0.38
    names = [r["peer"] for r in rows]
    ax1.bar([i - w / 2 for i in x], [r["megams"]["tokens_per_s"] for r in rows], w, label="megams")
    ax1.bar([i + w / 2 for i in x], [r["peer_result"]["tokens_per_s"] for r in rows], w, label="peer")
    ax1.set_xticks(list(x))
    ax1.set_xticklabels([f"vs {n}" for n in names])
    ax1.set_ylabel("tokens/s")
    ax1.legend()
    ax2.bar([i - w / 2 for i in x], [r["megams"]["act_bytes_per_seq"] / report.MiB for r in rows], w, label="megams")
    ax2.bar([i + w / 2 for i in x], [r["peer_result"]["act_bytes_per_seq"] / report.MiB for r in rows], w,
            label="peer")
    ax2.set_xticks(list(x))
    ax2.set_xticklabels([f"vs {n}" for n in names])
    ax2.set_ylabel("saved activations MiB / sequence")
    report.save_figure(fig, path)

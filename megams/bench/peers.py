"""Study 3: megams against its peers on the same shape, data, batch, sequence, steps, threads and dtype:
  vanilla (learned positions)  vs Hugging Face transformers' GPT-2 (layernorm, GELU 4d MLP, learned
                                  positions, tied head), attn_implementation="sdpa"
  bottom-up (1 scale, avg pool, sum, repeat) vs hourglass-transformer-pytorch (naive resampling)
  vanilla (rotary, untied head) vs litgpt's GPT (litgpt.Config built here, no hub), SDPA causal path
Each peer runs in its fastest documented setting, named in the table's "peer setting" column.

Every model is measured in `repeats` fresh processes, the models alternating between repeats
(A B C D ... A B C D ...) so that machine noise hits all of them alike; the table gives per model the
median tokens/s with its spread (min–max) and megams ÷ peer as the median of the per-repeat ratios
(each repeat's megams run against the peer run next to it) with their spread. The JSON keeps every
repeat. Peers come from tools/requirements-bench.txt (installed only for benchmarks).

`profile_steps` > 0 adds one more fresh run per model under torch.profiler (not part of the timed
repeats): the share of each step spent in matmul + attention kernels (`kernel_ms`), and the row's
ceiling 1 / (the peer's share): megams ÷ peer if megams ran the peer's own matmuls and attention
kernel and nothing else. Both shares come from within one run, so machine noise between runs does
not enter. Where both sides run the same kernels (GPT-2 and litgpt: same shapes, same BLAS, same
SDPA kernel) no code around the kernels can beat the ceiling; hourglass' attention is einsum +
softmax, which megams' flash kernel replaces, so its row's ceiling is not a bound."""
from __future__ import annotations

import importlib.util
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

from megams.bench import report
from megams.bench.runner import run_fresh

PEER_MODULES = {"gpt2": "transformers", "hourglass": "hourglass_transformer_pytorch", "litgpt": "litgpt"}

# The setting each peer runs in (what the table names): its fastest documented option on CPU fp32.
PEER_SETTINGS = {
    "gpt2": "attn_implementation=sdpa, activation_function=gelu (torch's fused exact GELU, megams' MLP)",
    "hourglass": "attn_resampling=False, updown_sample_type=naive (package has no SDPA/fused option)",
    "litgpt": "F.scaled_dot_product_attention(is_causal=True), fused qkv Linear",
}


def pairs(d: int, heads: int, L: int, k: int, seq_len: int):
    """(label, megams model, peer impl, peer model) for the three comparisons (learned position
    tables sized to seq_len on both sides, as the peers size theirs)."""
    v = {"type": "vanilla", "n_layers": L, "d_model": d, "n_heads": heads, "vocab_size": 256,
         "positions": "learned", "max_seq_len": seq_len, "norm": "layernorm", "mlp": "gelu"}
    # litgpt has rotary positions only and an untied head: megams' vanilla in that shape
    v_rot = {**v, "positions": "rotary", "tie_embeddings": False}
    pre, post = max(1, L // 4), max(1, L // 4)
    valley = L - pre - post
    bu = {"type": "bottom_up", "shorten_factors": [k], "layers_per_scale": [pre, valley], "n_post": post,
          "d_model": d, "n_heads": heads, "vocab_size": 256, "positions": "learned", "max_seq_len": seq_len,
          "pooling": "avg",
          "aggregation": "sum", "upsampling": "repeat"}
    return [
        (f"vanilla {L}L d{d}", v, "gpt2", {"vocab_size": 256, "d_model": d, "n_heads": heads, "n_layers": L,
                                           "attn_implementation": "sdpa", "activation_function": "gelu"}),
        (f"bottom-up {pre}+{valley}@{k}+{post} d{d}", bu, "hourglass",
         {"vocab_size": 256, "d_model": d, "n_heads": heads, "depth": [pre, valley, post], "shorten_factor": k}),
        (f"vanilla rotary {L}L d{d}", v_rot, "litgpt",
         {"vocab_size": 256, "d_model": d, "n_heads": heads, "n_layers": L}),
    ]


def available() -> dict:
    """Which peers are installed (found on the path; not imported: litgpt pulls in lightning)."""
    out = {}
    for name, mod in PEER_MODULES.items():
        try:
            out[name] = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            out[name] = False
    return out


def spread(values: Sequence[float]) -> dict:
    """Median and spread (min, max) of repeated measurements."""
    vals = [float(x) for x in values]
    if not vals:
        raise ValueError("no measurements")
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def paired_ratios(ours: Sequence[float], theirs: Sequence[float]) -> dict:
    """megams ÷ peer per repeat (repeat i of each, run side by side), as `spread` plus the list."""
    if len(ours) != len(theirs):
        raise ValueError(f"{len(ours)} megams repeats vs {len(theirs)} peer repeats")
    r = [a / b for a, b in zip(ours, theirs)]
    return {**spread(r), "values": r}


KERNEL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")  # + any scaled_dot_product op
# on CUDA the profile ranks device kernels (cuBLAS / CUTLASS GEMMs, flash / memory-efficient attention)
DEVICE_KERNEL_WORDS = ("gemm", "cutlass", "flash", "fmha", "attention", "matmul")


def kernel_ms(profile: dict) -> float:
    """Matmul + attention kernel self time per step (ms) in a runner profile (`profile_top` must reach
    past them: the study asks for all ops)."""
    if "device" in profile.get("by", ""):
        return sum(o["self_ms"] for o in profile["top"]
                   if any(w in o["op"].lower() for w in DEVICE_KERNEL_WORDS))
    return sum(o["self_ms"] for o in profile["top"] if o["op"] in KERNEL_OPS or "scaled_dot_product" in o["op"])


def _fmt_spread(s: dict, fmt=report.fmt) -> str:
    return f"{fmt(s['median'])} ({fmt(s['min'])}–{fmt(s['max'])})"


def _fmt_ratio(s: dict) -> str:
    return f"{s['median']:.2f}x ({s['min']:.2f}–{s['max']:.2f})"


def run(corpus: str, out_dir: str, d: int = 256, heads: int = 4, L: int = 4, k: int = 4, seq_len: int = 256,
        batch: int = 8, steps: int = 30, threads: int = 2, repeats: int = 3, runner=run_fresh,
        data_cache: str = ".cache/megams-data", log=print, have: Optional[Dict[str, bool]] = None,
        plot_png: bool = True, profile_steps: int = 0, device: str = "cpu") -> dict:
    """Run the study; `have` overrides `available()` (tests with a fake runner). `device`: cpu, or
    cuda (both sides on the GPU; the profile then times device kernels)."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    have = available() if have is None else have
    t_all = time.time()
    common = {"data_path": corpus, "seq_len": seq_len, "batch": batch, "steps": steps, "threads": threads,
              "precision": "fp32", "timed_skip": 3, "eval_batches": 0,
              "data_cache": data_cache, "device": device}
    todo = []
    for label, ours, impl, peer in pairs(d, heads, L, k, seq_len):
        if not have.get(impl):
            log(f"[peers] {impl} not installed (pip install -r tools/requirements-bench.txt -c constraints.txt): skipped")
            continue
        todo.append((label, impl,
                     {**common, "label": f"megams {label}", "impl": "megams", "model": ours},
                     {**common, "label": f"{impl} {label}", "impl": impl, "model": peer}))
    # A B C D ... per repeat, every model in a fresh process each time
    runs: Dict[str, List[dict]] = {}
    order: List[str] = []
    for rep in range(repeats):
        for label, impl, a_spec, b_spec in todo:
            for spec in (a_spec, b_spec):
                r = runner(dict(spec))
                r.pop("loss_curve", None)
                r["repeat"] = rep
                runs.setdefault(spec["label"], []).append(r)
                order.append(spec["label"])
                log(f"[peers] repeat {rep + 1}/{repeats} {spec['label']}: {r['tokens_per_s']:.0f} tok/s")
    profiles: Dict[str, dict] = {}
    if profile_steps:
        for label, impl, a_spec, b_spec in todo:
            for spec in (a_spec, b_spec):
                r = runner({**spec, "steps": max(6, min(steps, 12)), "measure_activations": False,
                            "profile_steps": profile_steps, "profile_top": 1000})
                p = r["profile"]
                profiles[spec["label"]] = {"self_ms": p["self_s"] * 1e3, "kernel_ms": kernel_ms(p),
                                           "top": p["top"][:12]}
                log(f"[peers] profiled {spec['label']}: {p['self_s'] * 1e3:.1f} ms/step, matmul + attention "
                    f"{profiles[spec['label']]['kernel_ms']:.1f} ms")
    rows = []
    for label, impl, a_spec, b_spec in todo:
        a_runs, b_runs = runs[a_spec["label"]], runs[b_spec["label"]]
        a_tok = [r["tokens_per_s"] for r in a_runs]
        b_tok = [r["tokens_per_s"] for r in b_runs]
        a, b = a_runs[0], b_runs[0]
        row = {"shape": label, "peer": impl, "peer_version": b.get("peer_version", "?"),
               "peer_setting": b.get("setting") or PEER_SETTINGS[impl], "repeats": repeats,
               "megams_params": a["params"], "peer_params": b["params"],
               "megams_tokens_per_s": spread(a_tok), "peer_tokens_per_s": spread(b_tok),
               "tok_ratio": paired_ratios(a_tok, b_tok),
               "megams_act_bytes_per_seq": a["act_bytes_per_seq"], "peer_act_bytes_per_seq": b["act_bytes_per_seq"],
               "act_ratio": a["act_bytes_per_seq"] / b["act_bytes_per_seq"],
               "megams_peak_rss_bytes": spread([r["peak_rss_bytes"] for r in a_runs]),
               "peer_peak_rss_bytes": spread([r["peak_rss_bytes"] for r in b_runs]),
               "megams_runs": a_runs, "peer_runs": b_runs}
        row["rss_ratio"] = row["megams_peak_rss_bytes"]["median"] / row["peer_peak_rss_bytes"]["median"]
        if profiles:
            pa, pb = profiles[a_spec["label"]], profiles[b_spec["label"]]
            row.update({"megams_profile": pa, "peer_profile": pb,
                        "megams_kernel_share": pa["kernel_ms"] / pa["self_ms"],
                        "peer_kernel_share": pb["kernel_ms"] / pb["self_ms"],
                        # no kernel found (e.g. kernel names a device profile does not match): no ceiling
                        "ceiling": pb["self_ms"] / pb["kernel_ms"] if pb["kernel_ms"] else None})
        rows.append(row)
        t = row["tok_ratio"]
        log(f"[peers] {label}: megams {row['megams_tokens_per_s']['median']:.0f} tok/s vs {impl} "
            f"{row['peer_tokens_per_s']['median']:.0f} ({_fmt_ratio(t)} over {repeats} repeats); "
            f"saved bytes {row['act_ratio']:.2f}x; peak RSS {row['rss_ratio']:.2f}x")
    cols = [("shape", lambda r: r["shape"]), ("peer", lambda r: f"{r['peer']} {r['peer_version']}"),
            ("peer setting", lambda r: r["peer_setting"]),
            ("params megams / peer", lambda r: f"{r['megams_params'] / 1e6:.2f}M / {r['peer_params'] / 1e6:.2f}M"),
            ("tokens/s megams, median (min–max)", lambda r: _fmt_spread(r["megams_tokens_per_s"])),
            ("tokens/s peer, median (min–max)", lambda r: _fmt_spread(r["peer_tokens_per_s"])),
            ("megams ÷ peer, median (min–max)", lambda r: _fmt_ratio(r["tok_ratio"])),
            ("act MiB/seq megams", lambda r: r["megams_act_bytes_per_seq"] / report.MiB),
            ("act MiB/seq peer", lambda r: r["peer_act_bytes_per_seq"] / report.MiB),
            ("act ratio", lambda r: f"{r['act_ratio']:.2f}x"),
            ("peak RSS MiB megams", lambda r: r["megams_peak_rss_bytes"]["median"] / report.MiB),
            ("peak RSS MiB peer", lambda r: r["peer_peak_rss_bytes"]["median"] / report.MiB),
            ("RSS ratio", lambda r: f"{r['rss_ratio']:.2f}x")]
    if profiles:
        cols += [("matmul + attention share megams / peer",
                  lambda r: f"{r['megams_kernel_share']:.0%} / {r['peer_kernel_share']:.0%}"),
                 ("ceiling (1 / peer share)", lambda r: f"{r['ceiling']:.2f}x" if r["ceiling"] else "–")]
    text = report.table(rows, cols)
    setting = {"corpus": corpus, "d_model": d, "n_heads": heads, "L": L, "k": k, "seq_len": seq_len, "batch": batch,
               "steps": steps, "threads": threads, "precision": "fp32", "repeats": repeats,
               "profile_steps": profile_steps, "device": device,
               "order": "models alternate within each repeat, a fresh process per run", "run_order": order,
               "peer_settings": {impl: PEER_SETTINGS[impl] for _, impl, _, _ in todo}}
    payload = {"study": "peers", "machine": report.machine(), "setting": setting, "rows": rows,
               "wall_s": time.time() - t_all}
    report.write_outputs(out_dir, "peers", payload, text)
    if rows and plot_png:
        plot(rows, f"{out_dir}/peers.png")
    log(text)
    return payload


def plot(rows: List[dict], path: str) -> None:
    """Median tokens/s with min–max error bars, and saved activations per sequence."""
    fig, (ax1, ax2) = report.new_figure(2, width=4.8)
    x = range(len(rows))
    w = 0.38
    names = [r["peer"] for r in rows]

    def bars(ax, key, off, label):
        med = [r[key]["median"] for r in rows]
        err = [[m - r[key]["min"] for m, r in zip(med, rows)], [r[key]["max"] - m for m, r in zip(med, rows)]]
        ax.bar([i + off for i in x], med, w, yerr=err, capsize=3, label=label)

    bars(ax1, "megams_tokens_per_s", -w / 2, "megams")
    bars(ax1, "peer_tokens_per_s", w / 2, "peer")
    ax1.set_xticks(list(x))
    ax1.set_xticklabels([f"vs {n}" for n in names])
    ax1.set_ylabel(f"tokens/s (median, min–max of {rows[0]['repeats']})")
    ax1.legend()
    ax2.bar([i - w / 2 for i in x], [r["megams_act_bytes_per_seq"] / report.MiB for r in rows], w, label="megams")
    ax2.bar([i + w / 2 for i in x], [r["peer_act_bytes_per_seq"] / report.MiB for r in rows], w, label="peer")
    ax2.set_xticks(list(x))
    ax2.set_xticklabels([f"vs {n}" for n in names])
    ax2.set_ylabel("saved activations MiB / sequence")
    report.save_figure(fig, path)

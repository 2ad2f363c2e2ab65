"""Study 1, the paper's claim: validation perplexity against memory, at equal tokens and width.

Models (width d, heads h, vanilla depth L), each with its own learning rate (tuned on tiny
Shakespeare at 2M tokens, docs/RESULTS.md §1: deeper models are not the ones that want less):
  vanilla-L, vanilla-L/2          the baselines (lr 4e-3)
  bottom-up  2L-1 layers: 0 + 1 @ n/4 + (2L-4) @ n/16 + 2 full-resolution layers after the sum
             aggregation, linear pooling and upsampling, norm scale merge (lr 4e-3; 0.79x vanilla-L/2's
             activation memory at L=8)
  top-down   2L layers: n_0 = L/4, n_1 = 3L/8, the rest at n/16, linear pooling, norm merge (lr 8e-3;
             4e-3 with a sub-word tokenizer)
  retina     L/2 full-resolution layers, windows (16, 4, 4) over pools (4, 16) (lr 4e-3)
Each model trains in a fresh process (its own peak RSS) on the same batches.

Tokens: bytes (default), or `tokenizer="bpe:N"`: a sentencepiece BPE vocabulary of N pieces trained
here on the head of the corpus that the validation split never reads (`study_tokenizer`), as the
paper's book corpus used sub-words. Bits per byte divide by the validation text's real bytes, so
rows with different tokenizers compare.
"""
from __future__ import annotations

import json
import time
from typing import Dict, List, Optional

from megams.bench import report
from megams.bench.runner import run_fresh

LR = {"vanilla": 4e-3, "bottom_up": 4e-3, "top_down": 8e-3, "retina": 4e-3}  # RESULTS.md §1a (2M-token sweep)
# with sub-word tokens top-down wants 4e-3 (8e-3: 2.45 bits/byte vs 2.20, unstable); vanilla and bottom-up
# keep 4e-3 (vanilla 2e-3 / 4e-3 / 8e-3: 2.205 / 2.171 / 2.185; bottom-up 8e-3: 2.33); RESULTS.md §1b
LR_SUBWORD = {**LR, "top_down": 4e-3}


RUN_OPTIONS = ("lr", "warmup", "weight_decay", "min_lr_ratio")  # a model's own optimiser setting (per depth)


def split_run_options(m: dict):
    """A models-file entry is ModelConfig fields plus, optionally, its own `lr` / `warmup` /
    `weight_decay` / `min_lr_ratio` (they replace the study's for that model only)."""
    return ({k: v for k, v in m.items() if k not in RUN_OPTIONS},
            {k: v for k, v in m.items() if k in RUN_OPTIONS})


def default_models(d: int, heads: int, L: int, tokenizer: str = "byte") -> Dict[str, dict]:
    """The study's models at width d, each with its learning rate (`LR` for bytes, `LR_SUBWORD` for a
    BPE / sentencepiece tokenizer): two vanilla baselines, the bottom-up at <= 0.80x vanilla-L/2's
    memory, top-down and retina (module docstring)."""
    lr = LR if tokenizer == "byte" else LR_SUBWORD
    c = {"d_model": d, "n_heads": heads}
    td0, td1 = max(1, L // 4), max(1, 3 * L // 8)
    n = 2 * L
    return {
        f"vanilla-{L}": {"type": "vanilla", "n_layers": L, **c, "lr": lr["vanilla"]},
        f"vanilla-{L // 2}": {"type": "vanilla", "n_layers": L // 2, **c, "lr": lr["vanilla"]},
        f"bottom-up-{n - 1} 0+1@4+{n - 4}@16+2": {
            "type": "bottom_up", "shorten_factors": [4, 4], "layers_per_scale": [0, 1, n - 4], "n_post": 2,
            "pooling": "linear", "aggregation": "sum", "upsampling": "linear", "scale_merge": "norm", **c,
            "lr": lr["bottom_up"]},
        f"top-down-{n}": {"type": "top_down", "shorten_factors": [4, 4], **c,
                          "layers_per_scale": [td0, td1, n - td0 - td1], "pooling": "linear", "lr": lr["top_down"]},
        f"retina-{L // 2}": {"type": "retina", "n_layers": L // 2, "retina_factors": [4, 16],
                             "retina_windows": [16, 4, 4], **c, "lr": lr["retina"]},
    }


BPE_TRAIN_FRACTION = 0.88  # of the corpus' characters: the validation split is the last 10% of the token stream


def check_tokenizer(tokenizer: str) -> None:
    """The study's `tokenizer` option is "byte", "bpe:N" (N > 260) or an existing .model file: ValueError
    naming the option otherwise (before any model trains)."""
    import os
    if tokenizer == "byte" or os.path.isfile(tokenizer):
        return
    if tokenizer.startswith("bpe:") and tokenizer[4:].isdigit() and int(tokenizer[4:]) > 260:
        return
    raise ValueError(f"--tokenizer {tokenizer}: expected byte, bpe:N with N > 260 (256 byte-fallback pieces + "
                     "unk + eos + merges) or a sentencepiece .model file")


def study_tokenizer(corpus: str, tokenizer: str, cache_dir: str, log=print):
    """(tokenizer for DataConfig, vocab size) from the study's `tokenizer` option: "byte"; "bpe:N" (a
    BPE model of N pieces trained on the first `BPE_TRAIN_FRACTION` of `corpus`, cut at a line, cached
    by the corpus' hash); or a sentencepiece .model file."""
    import hashlib
    import os

    from megams.data.tokenizers import load_tokenizer, train_sentencepiece
    check_tokenizer(tokenizer)
    if tokenizer.startswith("bpe:"):
        n = int(tokenizer[4:])
        with open(corpus, encoding="utf-8") as f:
            text = f.read()
        head = text[:int(len(text) * BPE_TRAIN_FRACTION)]
        head = head[:head.rfind("\n") + 1] or head
        key = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
        prefix = os.path.join(cache_dir, "tokenizers", f"{os.path.basename(corpus)}-{key}-bpe{n}")
        if not os.path.exists(prefix + ".model"):  # trained under a temporary name, then renamed: a killed
            os.makedirs(os.path.dirname(prefix), exist_ok=True)  # run never leaves a half-written model
            tmp = f"{prefix}.tmp{os.getpid()}"
            with open(tmp + ".txt", "w", encoding="utf-8") as f:
                f.write(head)
            log(f"[tradeoff] training a {n}-piece BPE on the first {len(head):,} characters of {corpus}")
            train_sentencepiece([tmp + ".txt"], tmp, n, model_type="bpe")
            os.replace(tmp + ".vocab", prefix + ".vocab")
            os.replace(tmp + ".model", prefix + ".model")
            os.remove(tmp + ".txt")
        tokenizer = prefix + ".model"
    tok = load_tokenizer(tokenizer)
    return tokenizer, tok.vocab_size


def run(corpus: str, out_dir: str, d: int = 128, heads: int = 4, L: int = 8, seq_len: int = 256, batch: int = 8,
        steps: int = 1000, lr: float = 1e-3, eval_batches: int = 16, eval_every: int = 250, threads: int = 2,
        runner=run_fresh, data_cache: str = ".cache/megams-data", device: str = "cpu",
        models: Optional[Dict[str, dict]] = None, only: Optional[List[str]] = None, resume: bool = False,
        seeds: Optional[List[int]] = None, tokenizer: str = "byte", log=print) -> dict:
    """`resume`: keep the runs of an earlier run in `out_dir` with the same setting and model config
    (results are written after every run, so an interrupted or extended study continues); its
    models outside this set (`only`) stay in the result with the seeds they had.
    `seeds`: one run per seed (model init and batch order); a row's `val_bpb` / `val_ppl` /
    `tokens_per_s` are the means over them, `*_std` the sample standard deviations, `runs` each
    seed's result. Default: the runner's one seed (1234)."""
    models = models or default_models(d, heads, L, tokenizer)
    if only:
        models = {k: v for k, v in models.items() if any(o in k for o in only)}
    seeds = list(seeds) if seeds else [DEFAULT_SEED]
    tok_path, vocab = study_tokenizer(corpus, tokenizer, data_cache, log) if corpus else ("byte", 256)
    setting = {"corpus": corpus, "d_model": d, "n_heads": heads, "L": L, "seq_len": seq_len, "batch": batch,
               "steps": steps, "tokens": steps * batch * seq_len, "lr": lr, "precision": "fp32",
               "threads": threads, "eval_batches": eval_batches, "device": device}
    if tokenizer != "byte":  # (byte studies keep the setting they always had, so --resume still finds them)
        setting.update({"tokenizer": tokenizer, "vocab_size": vocab})
    earlier = _earlier_runs(out_dir, setting) if resume else {}
    runs: Dict[str, Dict[int, dict]] = {}
    t_all = time.time()
    for label, m in models.items():
        for seed in seeds:
            old = earlier.get(label, {}).get(seed)
            if old is not None and old["model_cfg"] == m:
                runs.setdefault(label, {})[seed] = old
                log(f"[tradeoff] {label} seed {seed}: kept from the earlier run in {out_dir}")
                continue
            t0 = time.time()
            arch, run_opts = split_run_options(m)
            spec = {"label": label, "model": {"vocab_size": vocab, **arch}, "data_path": corpus,
                    "tokenizer": tok_path, "seq_len": seq_len,
                    "batch": batch, "steps": steps, "lr": lr, "eval_batches": eval_batches,
                    "eval_every": eval_every, "threads": threads, "precision": "fp32", "data_cache": data_cache,
                    "device": device, "seed": seed, **run_opts}
            r = runner(spec)
            r["model_cfg"], r["seed"], r["wall_s"] = m, seed, time.time() - t0
            runs.setdefault(label, {})[seed] = r
            _save_partial(out_dir, setting, runs, earlier)
            log(f"[tradeoff] {label} seed {seed}: val ppl {r.get('val_ppl', float('nan')):.3f} "
                f"bpb {r.get('val_bpb', float('nan')):.4f} act {r['act_bytes_per_seq'] / report.MiB:.2f} MiB/seq "
                f"{r['tokens_per_s']:.0f} tok/s ({r['wall_s']:.0f} s)")
    for label, by_seed in earlier.items():  # resume: models of the earlier run not in this set stay in it
        if label not in runs:
            runs[label] = by_seed
    rows = [combine(list(by_seed.values())) for by_seed in runs.values()]
    base = next((r for r in rows if r["label"] == f"vanilla-{L // 2}"), rows[0])
    for r in rows:
        r["act_ratio"] = report.ratio(r["act_bytes_per_seq"], base["act_bytes_per_seq"])
    cols = columns(L)
    text = report.table(rows, cols)
    payload = {"study": "tradeoff", "machine": report.machine(), "setting": {**setting, "seeds": seeds},
               "rows": rows, "wall_s": time.time() - t_all}
    report.write_outputs(out_dir, "tradeoff", payload, text)
    plot(rows, f"{out_dir}/tradeoff.png", setting)
    log(text)
    return payload


DEFAULT_SEED = 1234  # megams.bench.runner's default
MEANS = ("val_bpb", "val_ppl", "tokens_per_s")


def combine(runs: List[dict]) -> dict:
    """One row from the runs of one model over several seeds: the first run's measurements that do
    not depend on the seed (params, memory, FLOPs, its eval curve), means and sample standard
    deviations of `MEANS`, and the runs themselves under `runs`."""
    import statistics
    row = {k: v for k, v in runs[0].items() if k not in ("seed", "wall_s")}
    for key in MEANS:
        vals = [r[key] for r in runs if r.get(key) is not None]
        if vals:
            row[key] = statistics.fmean(vals)
            row[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    row["seeds"] = [r["seed"] for r in runs]
    row["runs"] = runs
    return row


def columns(L: int):
    return [("model", lambda r: r["label"]), ("layers", lambda r: r["layers"]), ("params", lambda r: r["params"]),
            ("MFLOP/token", lambda r: r["flops_per_token"] / 1e6),
            ("act MiB/seq (saved)", lambda r: r["act_bytes_per_seq"] / report.MiB),
            (f"act vs vanilla-{L // 2}", lambda r: f"{r['act_ratio']:.2f}x"),
            ("act MiB/seq (cost model)", lambda r: r["act_bytes_per_seq_est"] / report.MiB),
            ("peak RSS MiB", lambda r: r["peak_rss_bytes"] / report.MiB),
            ("tokens/s", lambda r: r["tokens_per_s"]),
            ("seeds", lambda r: len(r.get("seeds") or [0])),
            ("val ppl", lambda r: _pm(r, "val_ppl", 3)),
            ("val bits/byte", lambda r: _pm(r, "val_bpb", 4))]


def _pm(r: dict, key: str, digits: int):
    """mean, or mean ± std over seeds."""
    if not r.get(key):
        return None
    if len(r.get("seeds") or []) > 1:
        return f"{r[key]:.{digits}f} ± {r[key + '_std']:.{digits}f}"
    return f"{r[key]:.{digits}f}"


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
        err = r.get("val_ppl_std") if label == r["label"] else None
        ax.errorbar([x], [y], yerr=[err] if err else None, fmt="^" if label != r["label"] else "o", ms=6, capsize=3)
        ax.annotate(label, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points", rotation=12)
        ev = r.get("evals") or []
        if ev:
            ax2.plot([e["step"] for e in ev], [e["val_bpb"] for e in ev], marker="o", ms=3, label=r["label"])
    if top:
        ax.set_ylim(ppl[0] * 0.98, top * 1.02)
        bpb = sorted(r["val_bpb"] for r in rows if r.get("val_bpb"))
        ax2.set_ylim(bpb[0] * 0.97, bpb[0] * 1.35)
    ax.set_xlabel("activation memory per sequence (MiB, saved for backward, fp32)")
    ax.set_ylabel(f"validation perplexity ({'bytes' if setting.get('tokenizer', 'byte') == 'byte' else 'BPE tokens'})")
    ax.set_title(f"equal tokens ({setting['tokens'] / 1e6:.1f}M{', ' + setting['tokenizer'] if 'tokenizer' in setting else ''}),"
                 f" d={setting['d_model']}, T={setting['seq_len']}"
                 f" (mean ± std over seeds)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax2.set_xlabel("step")
    ax2.set_ylabel("validation bits/byte")
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    report.save_figure(fig, path)


def _earlier_runs(out_dir: str, setting: dict) -> Dict[str, Dict[int, dict]]:
    """{label: {seed: run}} of an earlier study in `out_dir` with the same setting."""
    for name in ("tradeoff.json", "tradeoff.partial.json"):
        try:
            with open(f"{out_dir}/{name}") as f:
                old = json.load(f)
        except (OSError, ValueError):
            continue
        if {k: v for k, v in old.get("setting", {}).items() if k != "seeds"} == setting:
            out: Dict[str, Dict[int, dict]] = {}
            for r in old["rows"]:
                for run in r.get("runs") or [{**r, "seed": DEFAULT_SEED}]:
                    out.setdefault(r["label"], {})[run["seed"]] = run
            return out
    return {}


def _save_partial(out_dir: str, setting: dict, runs: Dict[str, Dict[int, dict]],
                  earlier: Dict[str, Dict[int, dict]]) -> None:
    import os
    os.makedirs(out_dir, exist_ok=True)
    merged = {label: dict(by_seed) for label, by_seed in earlier.items()}
    for label, by_seed in runs.items():
        merged.setdefault(label, {}).update(by_seed)
    rows = [{"label": label, "runs": list(by_seed.values())} for label, by_seed in merged.items()]
    with open(f"{out_dir}/tradeoff.partial.json", "w") as f:
        json.dump({"setting": setting, "rows": rows}, f, indent=1)


def load_models(path: str) -> Dict[str, dict]:
    """{label: ModelConfig fields (+ run options)}; each entry is validated here, so a typo names the
    file, the model and the field before any model trains."""
    from pydantic import ValidationError

    from megams.config.schema import ModelConfig
    try:
        with open(path) as f:
            models = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"--models {path}: cannot read a JSON object of models: {e}") from None
    if not isinstance(models, dict) or not models:
        raise ValueError(f"--models {path}: expected a JSON object {{label: model fields}}, got {type(models).__name__}")
    for label, m in models.items():
        arch, _ = split_run_options(m)
        try:
            ModelConfig(**{"vocab_size": 256, **arch})
        except (ValidationError, TypeError) as e:
            raise ValueError(f"--models {path}: model {label!r}: {e}") from None
    return models

"""Train or time one model and measure it: the code every benchmark study shares.

    result = run_spec(spec)          # in this process
    result = run_fresh(spec)         # in a fresh Python process (clean peak-memory reading)

A spec is a plain JSON-able dict (see `DEFAULTS`); `spec["impl"]` picks who builds the model:
"megams" (a `ModelConfig` dict in `spec["model"]`), "gpt2" (Hugging Face transformers),
"hourglass" (hourglass-transformer-pytorch) or "litgpt" (litgpt.model.GPT), the last three only for
the peer study.

The loop is a plain torch loop (AdamW, warmup + cosine, grad clipping), not the DeepSpeed trainer:
the studies compare models, and the trainer's own numbers are the `tiny` study's job.
"""
from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from typing import Callable, Optional

DEFAULTS = {
    "impl": "megams",
    "model": {},              # megams: ModelConfig fields; gpt2/hourglass/litgpt: their shape (see _build_peer)
    "data_path": None,        # text file; None: random tokens (timing only)
    "data_cache": ".cache/megams-data",
    "tokenizer": "byte",      # "byte" or a sentencepiece .model file (model.vocab_size must cover it)
    "seq_len": 256,
    "batch": 16,
    "steps": 100,
    "timed_skip": 3,          # first steps not timed (allocator / compile warm-up)
    "lr": 1e-3,
    "min_lr_ratio": 0.1,
    "warmup": 0.05,
    "weight_decay": 0.1,
    "grad_clip": 1.0,
    "precision": "fp32",      # fp32 | bf16 (autocast)
    "compile": False,
    "ac": False,              # activation checkpointing of every transformer block
    "threads": None,          # torch.set_num_threads; None: leave as is
    "eval_batches": 0,        # validation batches (of `batch` sequences) at the end; 0: no evaluation
    "eval_every": 0,          # also evaluate every N steps (0: only at the end)
    "measure_activations": True,
    "seed": 1234,
    "profile_steps": 0,       # > 0: that many more training steps under torch.profiler; their top ops in the result
    "profile_top": 12,
    "device": "cpu",          # cpu | cuda (the documented larger GPU setting)
    "label": "",
}


def _rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def apply_block_checkpointing(model) -> str:
    """Recompute every transformer block in backward: megams.parallel.checkpointing.apply_ac (mode
    "full") when it exists, else torch.utils.checkpoint (non-reentrant) around each Block."""
    try:
        from megams.config.schema import Config
        from megams.parallel.checkpointing import apply_ac
    except ImportError:
        apply_ac = None
    if apply_ac is not None:
        cfg = Config()
        cfg.parallel.activation_checkpointing.mode = "full"
        apply_ac(model, cfg)
        return "megams.parallel.checkpointing.apply_ac(full)"
    import functools

    from torch.utils.checkpoint import checkpoint

    from megams.models.layers import Block
    for m in model.modules():
        if isinstance(m, Block):
            m.forward = functools.partial(checkpoint, m.forward, use_reentrant=False)
    return "torch.utils.checkpoint per Block"


def apply_block_compile(model) -> str:
    """torch.compile per transformer Block, as `training.compile` does in the trainer
    (megams.parallel.compile.apply_compile); returns its start-up line."""
    from megams.config.schema import Config
    from megams.parallel.compile import apply_compile
    cfg = Config()
    cfg.training.compile = True
    return apply_compile(model, cfg).describe()


def _build_megams(spec):
    from megams.config.schema import ModelConfig
    from megams.models import build_model
    from megams.models.cost import activation_bytes_per_token, flops_per_token
    cfg = ModelConfig(**spec["model"])
    model = build_model(cfg, seed=spec["seed"])
    T = spec["seq_len"]
    info = {"flops_per_token": flops_per_token(cfg, T),
            "act_bytes_per_seq_est": activation_bytes_per_token(cfg, T, 4 if spec["precision"] == "fp32" else 2) * T,
            "layers": _layer_count(cfg)}
    return model, info


def _layer_count(cfg) -> int:
    if cfg.type in ("vanilla", "retina"):
        return cfg.n_layers
    return sum(cfg.layers_per_scale) + (cfg.n_post if cfg.type == "bottom_up" else cfg.n_pre)


def _build_peer(spec):
    """Peers, same shape as the megams model they are compared with: vocab, d, heads, 4d GELU MLP,
    layernorm; learned positions and a tied head (GPT-2), learned positions and an untied head
    (hourglass, as the package does it), rotary positions and an untied head (litgpt, which has no
    learned positions). Each in its fastest documented setting (see megams.bench.peers.PEER_SETTINGS);
    `info["setting"]` says which, as built."""
    import torch
    m = spec["model"]
    torch.manual_seed(spec["seed"])
    if spec["impl"] == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel
        attn = m.get("attn_implementation", "sdpa")
        act = m.get("activation_function", "gelu")
        conf = GPT2Config(vocab_size=m["vocab_size"], n_positions=spec["seq_len"], n_embd=m["d_model"],
                          n_layer=m["n_layers"], n_head=m["n_heads"], resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=0.0, use_cache=False, activation_function=act, attn_implementation=attn)
        conf._attn_implementation = attn  # older transformers read only the private field
        hf = GPT2LMHeadModel(conf)

        class Wrap(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.hf = hf

            def forward(self, tokens):
                return self.hf(input_ids=tokens).logits
        import transformers
        return Wrap(), {"layers": m["n_layers"], "peer_version": transformers.__version__,
                        "setting": f"attn_implementation={hf.config._attn_implementation}, "
                                   f"activation_function={hf.config.activation_function}"}
    if spec["impl"] == "hourglass":
        from hourglass_transformer_pytorch import HourglassTransformerLM
        depth = tuple(m["depth"])  # (pre, valley, post)
        # the package's attention is einsum + masked softmax (no SDPA switch); its cheapest documented
        # resampling options: no attention resampling, naive (avg pool / repeat) up/down sampling
        model = HourglassTransformerLM(num_tokens=m["vocab_size"], dim=m["d_model"], max_seq_len=spec["seq_len"],
                                       depth=depth, shorten_factor=m["shorten_factor"], heads=m["n_heads"],
                                       dim_head=m["d_model"] // m["n_heads"], attn_resampling=False,
                                       updown_sample_type="naive", causal=True)
        return model, {"layers": sum(depth), "peer_version": _dist_version("hourglass-transformer-pytorch"),
                       "setting": "attn_resampling=False, updown_sample_type=naive (einsum attention: "
                                  "the package has no SDPA option)"}
    if spec["impl"] == "litgpt":
        from litgpt.config import Config
        from litgpt.model import GPT
        d, h, L = m["d_model"], m["n_heads"], m["n_layers"]
        # megams' vanilla: pre-norm LayerNorm blocks, sequential residual, bias-free linears, exact GELU
        # 4d MLP, full rotary, multi-head (no GQA); built here, nothing fetched from a hub
        conf = Config(name="megams-vanilla", block_size=spec["seq_len"], vocab_size=m["vocab_size"],
                      padded_vocab_size=m["vocab_size"], n_layer=L, n_head=h, n_embd=d, n_query_groups=h,
                      head_size=d // h, rotary_percentage=1.0, parallel_residual=False, bias=False,
                      attn_bias=False, lm_head_bias=False, norm_class_name="LayerNorm", norm_eps=1e-5,
                      mlp_class_name="GptNeoxMLP", intermediate_size=4 * d, gelu_approximate="none")
        model = GPT(conf)
        # GPT.forward(idx) without input_pos builds no mask: CausalSelfAttention calls
        # F.scaled_dot_product_attention(..., is_causal=True) (its SDPA path; no softcapping set)
        assert conf.attention_logit_softcapping is None
        return model, {"layers": L, "peer_version": _dist_version("litgpt"),
                       "setting": "F.scaled_dot_product_attention(is_causal=True), fused qkv"}
    raise ValueError(f"unknown impl {spec['impl']!r}")


def _dist_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


class _RandomTokens:
    """Timing-only data: uniform random bytes (no corpus needed)."""

    def __init__(self, vocab: int, seq_len: int, seed: int):
        self.vocab, self.seq_len, self.seed = vocab, seq_len, seed

    def batch(self, step: int, batch: int):
        import torch
        g = torch.Generator().manual_seed(self.seed + step)
        x = torch.randint(0, self.vocab, (batch, self.seq_len + 1), generator=g)
        return x[:, :-1], x[:, 1:]


class _Corpus:
    """A text file, tokenized (bytes or a sentencepiece model) and cut into windows by megams.data
    (train/valid = 90/10 of the token stream, in file order)."""

    def __init__(self, path: str, seq_len: int, seed: int, cache_dir: str, tokenizer: str = "byte"):
        from megams.config.schema import DataConfig
        from megams.data import build_data
        cfg = DataConfig(path=path, split=[0.9, 0.1, 0.0], seq_len=seq_len, cache_dir=cache_dir, num_workers=1,
                         tokenizer=tokenizer)
        self.bundle = build_data(cfg, seq_len, seed, progress=False)
        self.seq_len = seq_len

    def batch(self, step: int, batch: int):
        import numpy as np
        import torch
        n = len(self.bundle.train)
        ids = [(step * batch + j) % n for j in range(batch)]
        arr = torch.from_numpy(np.stack([self.bundle.train.sample(i) for i in ids]).astype(np.int64))
        return arr[:, :-1].contiguous(), arr[:, 1:].contiguous()

    def eval_batches(self, n_batches: int, batch: int):
        return self.bundle.eval_batches(n_batches, batch)


def _loss(logits, targets):
    import torch.nn.functional as F
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def measure_saved_bytes_per_seq(model, seq_len: int, vocab: int, autocast, device: str = "cpu") -> int:
    """Exact bytes autograd saves for backward per sequence of `seq_len` tokens: saved-tensor hooks,
    each storage once, parameters excluded; taken as the difference between batch 2 and batch 1 so
    batch-independent saves (autocast's bf16 weight copies, masks, rotary tables) cancel out."""
    import torch

    from megams.models.cost import saved_tensor_bytes
    params = list(model.parameters())
    out = []
    for b in (1, 2):
        x = torch.randint(0, vocab, (b, seq_len), generator=torch.Generator().manual_seed(0)).to(device)

        def fn():
            with autocast():
                logits = model(x)
            return _loss(logits, x)
        out.append(saved_tensor_bytes(fn, exclude=params))
    return out[1] - out[0]


def run_spec(spec: dict, log: Optional[Callable[[str], None]] = None) -> dict:
    """Train `spec["steps"]` steps and return what was measured (see module doc)."""
    spec = {**DEFAULTS, **spec}
    import torch
    if spec["threads"]:
        torch.set_num_threads(int(spec["threads"]))
    rss_import = _rss()
    T, B = spec["seq_len"], spec["batch"]
    if spec["impl"] == "megams":
        model, info = _build_megams(spec)
        vocab = spec["model"].get("vocab_size", 256)
    else:
        model, info = _build_peer(spec)
        vocab = spec["model"]["vocab_size"]
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    dev = spec["device"]
    cuda = dev.startswith("cuda")
    model = model.to(dev)
    data = (_Corpus(spec["data_path"], T, spec["seed"], spec["data_cache"], spec["tokenizer"]) if spec["data_path"]
            else _RandomTokens(vocab, T, spec["seed"]))
    bf16 = spec["precision"] == "bf16"

    def autocast():
        return torch.autocast(dev.split(":")[0], dtype=torch.bfloat16) if bf16 else nullcontext()

    result = {"label": spec["label"], "impl": spec["impl"], "params": n_params, **info,
              "seq_len": T, "batch": B, "steps": spec["steps"], "precision": spec["precision"],
              "compile": spec["compile"], "ac": spec["ac"], "threads": torch.get_num_threads()}
    if spec["measure_activations"]:
        result["act_bytes_per_seq"] = measure_saved_bytes_per_seq(model, T, vocab, autocast, dev)
    if spec["ac"]:
        result["ac_how"] = apply_block_checkpointing(model)
        if spec["measure_activations"]:
            result["act_bytes_per_seq_ac"] = measure_saved_bytes_per_seq(model, T, vocab, autocast, dev)
    fwd = model
    if spec["compile"]:
        if spec["impl"] == "megams":  # the trainer's path: torch.compile per Block (training.compile)
            result["compile_how"] = apply_block_compile(model)
        else:
            fwd = torch.compile(model)
            result["compile_how"] = "torch.compile(model)"

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=spec["lr"], betas=(0.9, 0.95),
                            foreach=True)
    steps = spec["steps"]
    warm = max(1, int(round(spec["warmup"] * steps)))

    def lr_at(s):
        if s < warm:
            return (s + 1) / warm
        p = min(1.0, (s - warm) / max(1, steps - warm))
        return spec["min_lr_ratio"] + (1 - spec["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * p))

    def evaluate():
        if not spec["eval_batches"] or not isinstance(data, _Corpus):
            return None
        model.eval()
        ev = data.eval_batches(spec["eval_batches"], B)
        tot, cnt = 0.0, 0
        with torch.no_grad():
            for x, y in ev.batches:
                x, y = x.to(dev), y.to(dev)
                with autocast():
                    logits = fwd(x)
                tot += _loss(logits, y).item() * y.numel()
                cnt += y.numel()
        model.train()
        loss = tot / cnt
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)),
                "val_bpb": loss / math.log(2) / ev.bytes_per_token}

    def train_step(s, x=None, y=None):
        if x is None:
            x, y = (t.to(dev) for t in data.batch(s, B))
        with autocast():
            logits = fwd(x)
        loss = _loss(logits, y)
        loss.backward()
        if spec["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return loss

    rss_ready = _rss()
    times, losses, evals = [], [], []
    model.train()
    t_start = time.perf_counter()
    for s in range(steps):
        for g in opt.param_groups:
            g["lr"] = spec["lr"] * lr_at(s)
        x, y = data.batch(s, B)
        x, y = x.to(dev), y.to(dev)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = train_step(s, x, y)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if log and (s + 1) % max(1, steps // 10) == 0:
            log(f"  [{spec['label']}] step {s + 1}/{steps} loss {losses[-1]:.4f} {times[-1] * 1e3:.0f} ms/step")
        if spec["eval_every"] and (s + 1) % spec["eval_every"] == 0 and s + 1 < steps:
            ev = evaluate()
            if ev:
                evals.append({"step": s + 1, **ev})
    train_s = time.perf_counter() - t_start
    if spec["profile_steps"]:
        result["profile"] = _profile(lambda: train_step(steps - 1), spec["profile_steps"], spec["profile_top"], cuda)
    timed = times[min(spec["timed_skip"], len(times) - 1):]
    step_s = statistics.median(timed)
    result.update({
        "step_time_s": step_s, "tokens_per_s": B * T / step_s, "train_wall_s": train_s,
        "first_step_s": times[0], "final_train_loss": statistics.mean(losses[-max(1, steps // 20):]),
        "loss_curve": losses[:: max(1, steps // 50)],
        "rss_after_build_bytes": rss_ready, "rss_after_import_bytes": rss_import, "peak_rss_bytes": _rss(),
    })
    if cuda:
        result["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
    if "flops_per_token" in result:
        result["tflops"] = result["flops_per_token"] * result["tokens_per_s"] / 1e12
    ev = evaluate()
    if ev:
        evals.append({"step": steps, **ev})
        result.update(ev)
    result["evals"] = evals
    return result


def _profile(step: Callable[[], object], n: int, top: int, cuda: bool) -> dict:
    """`n` calls of `step` under torch.profiler: the `top` operators by self time (host, or device on
    CUDA), per step, with their share of the profiled step time."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(n):
            step()
    wall = (time.perf_counter() - t0) / n
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    avgs = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in avgs) / n / 1e6  # s per step (self times add up to the step)
    ops = [{"op": e.key, "self_ms": getattr(e, key) / n / 1e3, "share": getattr(e, key) / n / 1e6 / total,
            "calls": e.count // n} for e in avgs[:top]]
    return {"steps": n, "step_s": wall, "self_s": total, "top": ops, "by": key}


def run_fresh(spec: dict, timeout: float = 3600, env: Optional[dict] = None) -> dict:
    """`run_spec(spec)` in a fresh Python process (its own peak RSS). Threads: spec["threads"]
    also sets OMP_NUM_THREADS for the child, so the OpenMP pool is sized before torch starts."""
    e = dict(os.environ, **(env or {}))
    if spec.get("threads"):
        e["OMP_NUM_THREADS"] = str(spec["threads"])
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    e["PYTHONPATH"] = root + os.pathsep + e.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "megams.bench.runner"], input=json.dumps(spec), text=True,
                          capture_output=True, timeout=timeout, env=e)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker failed for {spec.get('label')!r} (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"benchmark worker for {spec.get('label')!r} printed no result:\n{proc.stdout[-2000:]}")


def _worker() -> None:
    spec = json.loads(sys.stdin.read())
    res = run_spec(spec, log=lambda s: print(s, file=sys.stderr, flush=True))
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    _worker()

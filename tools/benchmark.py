#!/usr/bin/env python
"""megams benchmark studies: one subcommand each; every study prints a Markdown table and writes
raw JSON, the table and (most) a PNG plot into --out (default bench_out/<study>/).

    python tools/benchmark.py tradeoff   [--corpus FILE] [--tokenizer bpe:2048] [--steps 1000] [--layers 8] ...
    python tools/benchmark.py throughput [--batch 4] [--steps 6] [--quick]
    python tools/benchmark.py peers      [--corpus FILE] [--steps 30] [--repeats 3] [--profile-steps 4]
    python tools/benchmark.py scaling    [--config configs/tiny/vanilla.yaml] [--steps 8] [--layouts 2x1x1 ...]
    python tools/benchmark.py tiny       [--corpus FILE] [--steps 300]
    python tools/benchmark.py prefetch   [--config configs/tiny/bottom_up.yaml] [--steps 12] [--rounds 3]
    python tools/benchmark.py profile    [--size d512] [--option fused_qkv] [--profile-steps 4]

Timed runs share 2 cores here: wrap them in `flock /tmp/megams-heavy.lock`. See docs/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DEFAULT_CORPUS = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare", "input.txt"))


def _out(args, study):
    return args.out or os.path.join(ROOT, "bench_out", study)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmark.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="study", required=True)

    def common(sp, corpus=True):
        sp.add_argument("--out", default=None, help="output directory (default bench_out/<study>)")
        sp.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads per process")
        if corpus:
            sp.add_argument("--corpus", default=DEFAULT_CORPUS, help="plain-text (or JSONL) file, split 90/10")

    t = sub.add_parser("tradeoff", help="validation perplexity vs activation memory at equal tokens")
    common(t)
    t.add_argument("--d-model", type=int, default=128)
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--layers", type=int, default=8, help="L: vanilla-L and vanilla-L/2; hierarchical models get 2L")
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--lr", type=float, default=1e-3,
                   help="learning rate of models without their own (the default set and a --models entry may set \"lr\")")
    t.add_argument("--eval-batches", type=int, default=16)
    t.add_argument("--eval-every", type=int, default=250)
    t.add_argument("--only", nargs="*", default=None, help="run only models whose label contains one of these")
    t.add_argument("--resume", action="store_true",
                   help="keep rows of an earlier run in --out with the same setting and model config")
    t.add_argument("--device", default="cpu", help="cpu | cuda (the larger GPU setting in docs/RESULTS.md)")
    t.add_argument("--models", default=None, help="JSON file {label: ModelConfig fields} replacing the default set")
    t.add_argument("--seeds", type=int, nargs="*", default=None,
                   help="one run per seed; rows report mean and std (default: one seed, 1234)")
    t.add_argument("--tokenizer", default="byte",
                   help="byte (default), bpe:N (a sentencepiece BPE of N pieces trained on the corpus' training "
                        "head, cached) or a sentencepiece .model file; bits/byte compare across tokenizers")

    th = sub.add_parser("throughput", help="tokens/s, TFLOP/s and MFU vs the measured matmul peak")
    common(th, corpus=False)
    th.add_argument("--seq-len", type=int, default=256)
    th.add_argument("--batch", type=int, default=4)
    th.add_argument("--steps", type=int, default=4, help="timed steps per configuration (after warm-up)")
    th.add_argument("--quick", action="store_true", help="d256 only, no compile / checkpointing variants")
    th.add_argument("--compile-grid", nargs="*", metavar="SIZE", default=None,
                    help="only eager vs compiled (training.compile's per-block torch.compile) for vanilla and "
                         "bottom-up, fp32 and bf16, at these sizes (d128 = the tiny configs' width; default d128)")

    pe = sub.add_parser("peers", help="megams vs HF GPT-2, hourglass-transformer-pytorch and litgpt, each in its "
                                         "fastest setting, repeated in fresh processes")
    common(pe)
    pe.add_argument("--d-model", type=int, default=256)
    pe.add_argument("--heads", type=int, default=4)
    pe.add_argument("--layers", type=int, default=4)
    pe.add_argument("--seq-len", type=int, default=256)
    pe.add_argument("--batch", type=int, default=8)
    pe.add_argument("--steps", type=int, default=30)
    pe.add_argument("--repeats", type=int, default=3,
                    help="fresh processes per model, models alternating between repeats (median, min-max)")
    pe.add_argument("--profile-steps", type=int, default=4,
                    help="one more fresh run per model with this many steps under torch.profiler: its matmul + "
                         "attention share and the ceiling of megams / peer (0: off)")
    pe.add_argument("--device", default="cpu", help="cpu | cuda (both sides on the GPU)")

    sc = sub.add_parser("scaling", help="tokens/s, memory per rank and comm share across dp/tp/pp layouts")
    common(sc, corpus=False)
    sc.add_argument("--config", default="", help="trainer config (default configs/tiny/vanilla.yaml)")
    sc.add_argument("--steps", type=int, default=8, help="training steps per layout (the first 3 are warm-up)")
    sc.add_argument("--layouts", nargs="*", default=None, metavar="DPxTPxPP",
                    help="e.g. 2x1x1 1x2x2 (default: dp2, tp2, pp2, dp2xtp2, tp2xpp2, dp4)")
    sc.add_argument("--link-gbps", type=float, default=300.0,
                    help="8-GPU node model: GB/s per GPU and direction, as all-reduce bus bandwidth (H100 NVLink 4)")
    sc.add_argument("--latency-us", type=float, default=10.0, help="8-GPU node model: microseconds per collective")
    sc.add_argument("--gpu-tflops", type=float, default=400.0, help="8-GPU node model: achieved TFLOP/s per GPU")

    ti = sub.add_parser("tiny", help="configs/tiny/*.yaml through the real trainer")
    common(ti)
    ti.add_argument("--steps", type=int, default=300)
    ti.add_argument("--configs", nargs="*", default=None, help="default: configs/tiny/{vanilla,bottom_up,top_down,retina}.yaml")
    ti.add_argument("--set", action="append", default=[], help="extra trainer override, e.g. data.seq_len=128")

    pf = sub.add_parser("prefetch", help="tokens/s with the background batch prefetcher off and on, side by side")
    common(pf, corpus=False)
    pf.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny", "bottom_up.yaml"))
    pf.add_argument("--steps", type=int, default=12, help="timed steps per measurement (after one untimed)")
    pf.add_argument("--rounds", type=int, default=3, help="measurements per depth, alternating")
    pf.add_argument("--depths", type=int, nargs="*", default=[0, 2], help="data.prefetch values (first = baseline)")
    pf.add_argument("--device", default="cpu")
    pf.add_argument("--set", action="append", default=[], help="config override, e.g. data.seq_len=128")

    pr = sub.add_parser("profile", help="torch.profiler top ops of vanilla and bottom-up, a model option off vs on")
    common(pr, corpus=False)
    pr.add_argument("--size", default="d512", help="d128 | d256 | d512 | d768 (the throughput study's shapes)")
    pr.add_argument("--option", default="fused_qkv", help="a boolean ModelConfig field: off (before) vs on (after)")
    pr.add_argument("--steps", type=int, default=6, help="training steps before profiling (the first 2 untimed)")
    pr.add_argument("--profile-steps", type=int, default=4)
    pr.add_argument("--top", type=int, default=10)
    pr.add_argument("--seq-len", type=int, default=256)
    pr.add_argument("--batch", type=int, default=4)

    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    if getattr(a, "corpus", None) and not os.path.isfile(a.corpus):
        print(f"error: --corpus {a.corpus}: no such file", file=sys.stderr)
        return 2
    if a.study == "tradeoff":
        from megams.bench import tradeoff
        try:
            models = tradeoff.load_models(a.models) if a.models else None
            tradeoff.check_tokenizer(a.tokenizer)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        tradeoff.run(a.corpus, _out(a, "tradeoff"), d=a.d_model, heads=a.heads, L=a.layers, seq_len=a.seq_len,
                     batch=a.batch, steps=a.steps, lr=a.lr, eval_batches=a.eval_batches, eval_every=a.eval_every,
                     threads=a.threads, models=models, only=a.only, device=a.device,
                     resume=a.resume, seeds=a.seeds, tokenizer=a.tokenizer)
    elif a.study == "throughput":
        from megams.bench import throughput
        grid = throughput.default_grid(sizes=("d256",), big=None, options_size=None) if a.quick else None
        if a.compile_grid is not None:
            grid = throughput.compile_grid(a.compile_grid or ("d128",))
        throughput.run(_out(a, "throughput"), grid=grid, seq_len=a.seq_len, batch=a.batch, steps=a.steps,
                       threads=a.threads)
    elif a.study == "peers":
        from megams.bench import peers
        peers.run(a.corpus, _out(a, "peers"), d=a.d_model, heads=a.heads, L=a.layers, seq_len=a.seq_len,
                  batch=a.batch, steps=a.steps, threads=a.threads, repeats=a.repeats, profile_steps=a.profile_steps,
                  device=a.device)
    elif a.study == "scaling":
        from megams.bench import scaling
        node = dict(scaling.NODE, link_GBps=a.link_gbps, latency_us=a.latency_us, gpu_tflops=a.gpu_tflops)
        layouts = [tuple(int(x) for x in lay.lower().split("x")) for lay in a.layouts] if a.layouts else None
        return scaling.run(_out(a, "scaling"), threads=a.threads, steps=a.steps, config=a.config, layouts=layouts,
                           node=node)
    elif a.study == "tiny":
        from megams.bench import tiny
        tiny.run(a.corpus, _out(a, "tiny"), steps=a.steps, configs=a.configs, threads=a.threads, extra=[
            x for s in a.set for x in ("--set", s)])
    elif a.study == "prefetch":
        from megams.bench import prefetch
        prefetch.run(a.config, _out(a, "prefetch"), steps=a.steps, rounds=a.rounds, depths=a.depths,
                     threads=a.threads, device=a.device, overrides=a.set)
    elif a.study == "profile":
        from megams.bench import profile
        profile.run(_out(a, "profile"), size=a.size, option=a.option, seq_len=a.seq_len, batch=a.batch,
                    steps=a.steps, profile_steps=a.profile_steps, top=a.top, threads=a.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())

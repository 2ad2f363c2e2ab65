#!/usr/bin/env python
"""Sample text from a converted (plain-torch) megams model.

    python tools/generate.py exported/x --prompt "def main(" --max-new-tokens 200 \
        --temperature 0.8 --top-k 50 --top-p 0.95 --seed 0
    python tools/generate.py exported/x --benchmark --max-new-tokens 256        # tokens/s, cached vs full recompute
    python tools/generate.py --config configs/tiny/retina.yaml --benchmark       # a random-init model of a config

Decoding is incremental with a cache for every model type (megams.inference); --no-cache runs the full
forward over the whole prefix at every step (the reference).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", help="a model directory written by tools/convert_checkpoint.py")
    p.add_argument("--config", default=None,
                   help="instead of a model directory: a randomly initialised model of this training config "
                        "(its model section; byte tokenizer) - for benchmarks")
    p.add_argument("--prompt", default="\n", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--num-samples", type=int, default=1, help="continuations sampled together (a batch)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="keep the smallest set with this probability mass")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--no-cache", dest="cache", action="store_false", help="full recompute at every step")
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    p.add_argument("--benchmark", action="store_true",
                   help="print tokens/s of cached and full-recompute decoding as JSON instead of text")
    p.add_argument("--json", action="store_true", help="print the samples and timings as JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from megams.checkpoint import CheckpointError, load_pretrained
    from megams.inference import generate
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if (args.model is None) == (args.config is None):
            raise ValueError("give a model directory or --config (one of them)")
        if args.config:
            from megams.config import load_config
            from megams.data.tokenizers import ByteTokenizer
            from megams.models import build_model
            model = build_model(load_config(args.config).model, seed=0).eval()
            model.tokenizer = ByteTokenizer()
        else:
            model = load_pretrained(args.model)
        ids = model.tokenizer.encode(args.prompt)
        if not ids:
            raise ValueError("--prompt encodes to no tokens")
        prompt = torch.tensor([ids] * args.num_samples)
        kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                  vocab_limit=model.tokenizer.vocab_size)
        if args.benchmark:
            result = {"model": os.path.abspath(args.model or args.config), "type": model.cfg.type,
                      "prompt_tokens": len(ids),
                      "new_tokens": args.max_new_tokens, "batch": args.num_samples, "threads": torch.get_num_threads()}
            for cache in (True, False):
                stats = {}
                generate(model, prompt, args.max_new_tokens, cache=cache, stats=stats, **kw)
                result["cached" if cache else "recompute"] = {k: round(v, 4) for k, v in stats.items()}
            print(json.dumps(result, indent=1))
            return 0
        stats = {}
        out = generate(model, prompt, args.max_new_tokens, cache=args.cache, stats=stats, **kw)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    texts = [model.tokenizer.decode(row[len(ids):].tolist()) for row in out]
    if args.json:
        print(json.dumps({"prompt": args.prompt, "samples": texts, **stats}, indent=1))
    else:
        for i, text in enumerate(texts):
            if len(texts) > 1:
                print(f"--- sample {i}")
            print(args.prompt + text)
        print(f"[{stats['new_tokens']} tokens in {stats['decode_s']:.2f}s: {stats['tokens_per_s']:.1f} tokens/s, "
              f"{'cached' if args.cache else 'full recompute'}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

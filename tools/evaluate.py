#!/usr/bin/env python
"""Perplexity and bits per byte of a converted (plain-torch) megams model, as JSON.

    python tools/evaluate.py exported/x --data builtin --part valid            # the run's validation split
    python tools/evaluate.py exported/x --data book.txt --seq-len 1024 --stride 512
    python tools/evaluate.py exported/x --data data/mix --part all --max-windows 100 --output eval.json

--data: 'builtin' (the built-in corpus), an indexed dataset PREFIX, or a text / JSONL file (tokenized
with the model's tokenizer). --part cuts the token stream by --split (default: the training run's
data.split) as training does. Sliding windows: see megams.inference.evaluation (stride = seq_len + 1
reproduces the training run's validation windows).
"""
import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a model directory written by tools/convert_checkpoint.py")
    p.add_argument("--data", default="builtin", help="'builtin', an indexed dataset prefix, or a text/JSONL file")
    p.add_argument("--part", choices=("all", "train", "valid", "test"), default="all",
                   help="which part of the token stream (cut by --split)")
    p.add_argument("--split", default=None, help="train,valid,test fractions (default: the training run's)")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the training data.seq_len)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: --seq-len)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights and compute dtype")
    p.add_argument("--autocast-bf16", action="store_true", help="fp32 weights, bf16 autocast (training's bf16 ZeRO-0)")
    p.add_argument("--doc-sep", choices=("blank_line", "line"), default=None)
    p.add_argument("--text-key", default=None)
    p.add_argument("--output", default=None, help="also write the JSON result here")
    return p.parse_args(argv)


class ArgumentError(ValueError):
    pass


def check_args(args) -> None:
    """Refuse what argparse lets through: a window length, stride, batch or window count below 1 (0 used
    to fall back silently to the training seq_len, or to 1024), a --split that is not three fractions."""
    for option, value in (("--seq-len", args.seq_len), ("--stride", args.stride), ("--max-windows", args.max_windows),
                          ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ArgumentError(f"{option} {value}: expected an integer >= 1")
    if args.split is not None:
        parts = args.split.split(",")
        try:
            split = [float(x) for x in parts]
        except ValueError:
            split = None
        if split is None or len(split) != 3 or any(not x >= 0 for x in split) or sum(split) <= 0:
            raise ArgumentError(f"--split {args.split}: expected three non-negative fractions train,valid,test "
                                "(e.g. 0.9,0.1,0)")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
    except ArgumentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch

    from megams.checkpoint import CheckpointError, load_pretrained
    from megams.data.errors import DataError
    from megams.data.gpt_dataset import split_bounds
    from megams.inference.evaluation import evaluate_tokens, open_stream
    try:
        model = load_pretrained(args.model, dtype=torch.bfloat16 if args.dtype == "bf16" else None)
        export = {}
        if os.path.isfile(os.path.join(args.model, "export.json")):
            with open(os.path.join(args.model, "export.json")) as f:
                export = json.load(f)
        train_data = export.get("training", {}).get("data", {})
        spec = "byte" if model.tokenizer.name == "byte" else model.tokenizer.model_path
        seq_len = args.seq_len or train_data.get("seq_len") or 1024
        split = [float(x) for x in args.split.split(",")] if args.split else train_data.get("split", [0.9, 0.1, 0.0])
        with tempfile.TemporaryDirectory(prefix="megams-eval-") as tmp:
            ds = open_stream(args.data, spec, tmp, args.doc_sep or train_data.get("doc_sep", "blank_line"),
                             args.text_key or train_data.get("text_key", "text"))
            bounds = (0, ds.n_tokens) if args.part == "all" else \
                split_bounds(ds.n_tokens, split)[("train", "valid", "test").index(args.part)]
            if bounds[1] - bounds[0] < 2:
                cut = "" if args.part == "all" else f" (--split {','.join(f'{x:g}' for x in split)})"
                raise DataError(f"--data {args.data}: the {args.part} part{cut} holds {bounds[1] - bounds[0]} "
                                f"token(s) of {ds.n_tokens}, too short for one window (at least 2 tokens: one "
                                "input, one target)")
            result = evaluate_tokens(model, ds.tokens, bounds[0], bounds[1], seq_len, args.stride, args.batch_size,
                                     args.max_windows, ds.source_bytes_before, args.autocast_bf16)
    except (CheckpointError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = {"model": os.path.abspath(args.model), "data": args.data, "part": args.part,
              "split": split if args.part != "all" else None, "dtype": args.dtype,
              "autocast_bf16": args.autocast_bf16, **result}
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Convert a megams training checkpoint (any layout) to a plain-torch model directory.

    python tools/convert_checkpoint.py runs/x exported/x                 # a run dir: its latest checkpoint
    python tools/convert_checkpoint.py runs/x/checkpoints/step_00000100 exported/x --weights pt

Reads every shard (any tensor / pipeline / data-parallel degree, ZeRO 0-3, fp32 or bf16; fp32 master
weights where they exist) and writes model.safetensors (or model.pt), config.json, the tokenizer and
a README. Load the result with `from megams import load_pretrained` (torch only).
The shards are memory-mapped and each full tensor is assembled from the ranges that hold it and
written before the next is read: peak memory is about one full tensor, not the model (with
--weights pt the whole model, which torch.save needs).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megams.checkpoint import CheckpointError  # noqa: E402
from megams.checkpoint.export import export_checkpoint  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a run directory (its latest checkpoint) or one checkpoint directory")
    p.add_argument("output_dir", help="the model directory to write (must not exist, or be empty)")
    p.add_argument("--weights", choices=("safetensors", "pt"), default="safetensors", help="weights file format")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="dtype of the written weights")
    p.add_argument("--tokenizer", default=None,
                   help="the tokenizer to ship ('byte' or a .model file); default: the one the run trained with")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        written, report, n = export_checkpoint(args.source, args.output_dir, weights=args.weights,
                                               dtype=args.dtype, tokenizer=args.tokenizer)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in report:
        print(line)
    print(f"wrote {os.path.abspath(args.output_dir)}: {n:,} parameters ({args.dtype}); "
          + ", ".join(os.path.basename(w) for w in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Tokenize text / JSONL files (or the built-in corpus) into an indexed dataset PREFIX.bin + PREFIX.idx.

    python tools/preprocess_data.py --input a.txt b.jsonl --output-prefix data/mix --tokenizer tok.model
    python tools/preprocess_data.py --input a.txt --output-prefix data/a --format megatron   # Megatron-LM layout
    python tools/preprocess_data.py --convert data/a --output-prefix data/a_megams --format megams --tokenizer byte

Train with it by setting `data.path: data/mix` (the prefix); either layout is read (docs/DATA.md).
Tokenizing uses all available CPUs unless --workers says otherwise; memory stays flat whatever the input.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megams.data.errors import DataError  # noqa: E402
from megams.data.preprocess import available_cpus, convert, preprocess  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", nargs="+", default=None,
                     help="text or JSONL (.jsonl/.json) files, in order; omitted: the built-in corpus")
    src.add_argument("--convert", metavar="PREFIX", default=None,
                     help="rewrite this indexed dataset (megams or Megatron layout) in --format instead")
    p.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin and OUTPUT_PREFIX.idx")
    p.add_argument("--format", choices=("megams", "megatron"), default="megams",
                   help="megams (records the tokenizer and the source bytes) or Megatron-LM / GPT-NeoX (MMIDIDX)")
    p.add_argument("--tokenizer", default=None,
                   help="'byte' or a sentencepiece .model file (default byte; --convert: the dataset's own)")
    p.add_argument("--workers", type=int, default=None,
                   help=f"tokenizing processes (default: the available CPUs, {available_cpus()} here)")
    p.add_argument("--doc-sep", choices=("blank_line", "line"), default="blank_line",
                   help="text files: documents separated by blank lines, or one per line")
    p.add_argument("--text-key", default="text", help="JSONL files: the key holding the text")
    p.add_argument("--no-append-eod", dest="append_eod", action="store_false",
                   help="do not end every document with the end-of-document token")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        p.error(f"--workers: expected >= 1, got {args.workers}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.convert:
            ds = convert(args.convert, args.output_prefix, args.format, args.tokenizer, progress=args.progress)
        else:
            ds = preprocess(args.input, args.output_prefix, args.tokenizer or "byte", workers=args.workers,
                            append_eod=args.append_eod, doc_sep=args.doc_sep, text_key=args.text_key,
                            progress=args.progress, format=args.format)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    layout = " (Megatron layout)" if args.format == "megatron" else ""
    print(f"wrote {args.output_prefix}.bin/.idx{layout}: {len(ds):,} documents, {ds.n_tokens:,} tokens "
          f"({ds.dtype.name})" + (f", tokenizer {ds.meta['tokenizer']}" if ds.meta.get("tokenizer") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

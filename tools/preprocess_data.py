#!/usr/bin/env python
"""Tokenize text / JSONL files (or the built-in corpus) into an indexed dataset PREFIX.bin + PREFIX.idx.

    python tools/preprocess_data.py --input a.txt b.jsonl --output-prefix data/mix --tokenizer tok.model --workers 4

Train with it by setting `data.path: data/mix` (the prefix).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megams.data.errors import DataError  # noqa: E402
from megams.data.preprocess import preprocess  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", default=None,
                   help="text or JSONL (.jsonl/.json) files, in order; omitted: the built-in corpus")
    p.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin and OUTPUT_PREFIX.idx")
    p.add_argument("--tokenizer", default="byte", help="'byte' or a sentencepiece .model file")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    p.add_argument("--doc-sep", choices=("blank_line", "line"), default="blank_line",
                   help="text files: documents separated by blank lines, or one per line")
    p.add_argument("--text-key", default="text", help="JSONL files: the key holding the text")
    p.add_argument("--no-append-eod", dest="append_eod", action="store_false",
                   help="do not end every document with the end-of-document token")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        ds = preprocess(args.input, args.output_prefix, args.tokenizer, workers=args.workers,
                        append_eod=args.append_eod, doc_sep=args.doc_sep, text_key=args.text_key,
                        progress=args.progress)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output_prefix}.bin/.idx: {len(ds):,} documents, {ds.n_tokens:,} tokens "
          f"({ds.dtype.name}), tokenizer {ds.meta['tokenizer']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

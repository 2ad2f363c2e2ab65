#!/usr/bin/env python
"""Train a sentencepiece tokenizer (BPE or unigram) on text / JSONL files or the built-in corpus.

    python tools/train_tokenizer.py --input ../shared/data/tinyshakespeare/input.txt \
        --model-prefix tok/shakespeare --vocab-size 2048

Then set `data.tokenizer: tok/shakespeare.model` and `model.vocab_size` >= the vocab size.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megams.data.errors import DataError  # noqa: E402
from megams.data.tokenizers import load_tokenizer, train_sentencepiece  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", default=None,
                   help="text or JSONL (.jsonl/.json) files; omitted: the built-in corpus")
    p.add_argument("--model-prefix", required=True, help="writes MODEL_PREFIX.model and MODEL_PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--doc-sep", choices=("blank_line", "line"), default="blank_line")
    p.add_argument("--text-key", default="text")
    p.add_argument("--character-coverage", type=float, default=1.0)
    p.add_argument("--input-sentence-size", type=int, default=0,
                   help="train on a seeded sample of this many pieces of text (0: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        path = train_sentencepiece(args.input, args.model_prefix, args.vocab_size, model_type=args.model_type,
                                   doc_sep=args.doc_sep, text_key=args.text_key,
                                   character_coverage=args.character_coverage,
                                   input_sentence_size=args.input_sentence_size, num_threads=args.threads,
                                   seed=args.seed)
        tok = load_tokenizer(path)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}: vocab_size {tok.vocab_size}, end-of-document id {tok.eod_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Preprocessing throughput (MB/s of source text) for the byte and sentencepiece tokenizers at 1 and N
workers: the table in docs/DATA.md.

    python -m tests.data.bench_preprocess --mb 64 --workers 1 2 [--code-dir OTHER_CHECKOUT]

The corpus is tiny Shakespeare (../shared/data) or the built-in corpus, repeated to --mb MB, documents
separated by blank lines; the sentencepiece model (4096 BPE pieces) is trained on its first MB. Each
configuration runs in a fresh process (`--code-dir`: with another checkout's megams, e.g. the code before
a change); MB/s = input file bytes / wall seconds of `preprocess()` (reading, tokenizing, writing).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAKESPEARE = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare", "input.txt")

_CHILD = """
import json, resource, sys, time
from megams.data.preprocess import preprocess
src, out, tok, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
t = time.perf_counter()
ds = preprocess([src], out, tok, workers=workers, progress=False)
dt = time.perf_counter() - t
print("RESULT " + json.dumps({"seconds": dt, "tokens": ds.n_tokens, "documents": len(ds),
                              "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_corpus(path, mb):
    if os.path.isfile(SHAKESPEARE):
        with open(SHAKESPEARE, encoding="utf-8") as f:
            text = f.read()
    else:
        sys.path.insert(0, ROOT)
        from megams.data import builtin_corpus
        text = "\n\n".join(builtin_corpus().documents)
    text = text.strip() + "\n\n"
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < mb * 2**20:
            f.write(text)
            written += len(text.encode("utf-8"))
    return os.path.getsize(path)


def run(code_dir, src, out, tok, workers):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=code_dir)
    p = subprocess.run([sys.executable, "-c", _CHILD, src, out, tok, str(workers)], capture_output=True,
                       text=True, env=env, cwd=code_dir, timeout=3600)
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if not lines:
        raise SystemExit(p.stderr[-3000:])
    return json.loads(lines[-1][7:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokenizers", nargs="+", default=["byte", "sentencepiece"])
    ap.add_argument("--code-dir", default=ROOT)
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    with tempfile.TemporaryDirectory(prefix="megams-bench-") as d:
        src = os.path.join(d, "corpus.txt")
        size = make_corpus(src, args.mb)
        toks = {}
        if "byte" in args.tokenizers:
            toks["byte"] = "byte"
        if "sentencepiece" in args.tokenizers:
            from megams.data import train_sentencepiece
            head = os.path.join(d, "head.txt")
            with open(src, encoding="utf-8") as f, open(head, "w", encoding="utf-8") as g:
                g.write(f.read(2**20))
            toks["sentencepiece"] = train_sentencepiece([head], os.path.join(d, "sp"), 4096)
        print(f"corpus: {size / 1e6:.1f} MB, code: {args.code_dir}")
        print("| tokenizer | workers | MB/s | seconds | tokens | peak RSS (MB) |")
        print("|---|---|---|---|---|---|")
        for name, tok in toks.items():
            for w in args.workers:
                r = run(args.code_dir, src, os.path.join(d, f"out-{name}-{w}"), tok, w)
                print(f"| {name} | {w} | {size / 1e6 / r['seconds']:.1f} | {r['seconds']:.2f} | {r['tokens']:,} | "
                      f"{r['maxrss_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()

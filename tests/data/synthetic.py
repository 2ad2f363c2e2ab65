"""Large synthetic indexed datasets, written with plain numpy (seconds for 100M documents), for the
scale tests and benchmarks (tests/data/test_scale.py; `python -m tests.data.synthetic` prints the
open / lookup costs that docs/DATA.md records)."""
import json
import os
import resource
import struct
import sys
import time

import numpy as np

_BLOCK = 1 << 22  # documents written at once


def _doc_lengths(a, b, doc_len):
    """Lengths of documents a..b-1: doc_len on average (doc_len - 1 .. doc_len + 1, deterministic)."""
    return doc_len + (np.arange(a, b, dtype=np.int64) % 3) - 1


def _doc_tokens(n_tokens, seed):
    """Byte-level tokens: printable text-like ids (32..126) with the document's eod written after."""
    return np.random.default_rng(seed).integers(32, 127, n_tokens, dtype=np.uint8)


def write_megams(prefix, n_docs, doc_len=8, version=2):
    """A megams byte-level dataset of n_docs documents ending in eod (id 0), one byte of source per non-eod
    token. Returns the number of tokens. version=1: the old layout (per-document bytes), for comparisons."""
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    total, n_bytes = 0, 0
    off_path, cum_path = prefix + ".offsets.tmp", prefix + ".cum.tmp"
    with open(prefix + ".bin", "wb") as fb, open(off_path, "wb") as fo, open(cum_path, "wb") as fc:
        fo.write(np.zeros(1, "<i8").tobytes())
        if version == 2:
            fc.write(np.zeros(1, "<i8").tobytes())
        for a in range(0, n_docs, _BLOCK):
            b = min(n_docs, a + _BLOCK)
            lengths = _doc_lengths(a, b, doc_len)
            ends = total + np.cumsum(lengths)
            tokens = _doc_tokens(int(lengths.sum()), a)
            tokens[ends - total - 1] = 0  # eod
            fb.write(tokens.tobytes())
            fo.write(ends.astype("<i8").tobytes())
            fc.write(((n_bytes + np.cumsum(lengths - 1)) if version == 2 else lengths - 1).astype("<i8").tobytes())
            total, n_bytes = int(ends[-1]), n_bytes + int((lengths - 1).sum())
    meta = {"tokenizer": "byte", "tokenizer_fingerprint": "byte", "eod_id": 0, "append_eod": True,
            "source": f"synthetic: {n_docs} documents", "vocab_size": 256, "n_documents": n_docs,
            "n_tokens": total, "source_bytes": n_bytes}
    blob = json.dumps(meta, sort_keys=True).encode()
    with open(prefix + ".idx", "wb") as f:
        f.write(struct.pack("<8sIIQQ", b"MEGAMSID", version, 1, n_docs, len(blob)))
        for p in (off_path, cum_path):
            with open(p, "rb") as src:
                while True:
                    chunk = src.read(1 << 24)
                    if not chunk:
                        break
                    f.write(chunk)
            os.remove(p)
        f.write(blob)
    return total


def write_megatron(prefix, n_docs, doc_len=8):
    """The same documents in the Megatron layout (uint16, one sequence per document)."""
    total = 0
    S = n_docs
    with open(prefix + ".bin", "wb") as fb, open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, S, S + 1))
        for a in range(0, n_docs, _BLOCK):  # lengths, and the tokens
            b = min(n_docs, a + _BLOCK)
            lengths = _doc_lengths(a, b, doc_len)
            tokens = _doc_tokens(int(lengths.sum()), a).astype("<u2")
            tokens[np.cumsum(lengths) - 1] = 0
            fb.write(tokens.tobytes())
            f.write(lengths.astype("<i4").tobytes())
        for a in range(0, n_docs, _BLOCK):  # pointers
            b = min(n_docs, a + _BLOCK)
            lengths = _doc_lengths(a, b, doc_len)
            starts = total + np.concatenate([[0], np.cumsum(lengths[:-1])])
            f.write((starts * 2).astype("<i8").tobytes())
            total += int(lengths.sum())
        for a in range(0, S + 1, _BLOCK):
            f.write(np.arange(a, min(S + 1, a + _BLOCK), dtype="<i8").tobytes())
    return total


def rss_mb():
    """Current resident set (MB), from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def open_cost(prefix, seq_len=1024, tokenizer="byte"):
    """Seconds and resident MB to open `prefix`, build its splits, read 64 shuffled windows and count the
    source bytes of 64 evaluation windows."""
    from megams.data import load_tokenizer
    from megams.data.batches import eval_batches
    from megams.data.gpt_dataset import build_splits
    from megams.data.indexed import IndexedDataset, check_tokenizer
    rss0, t0 = rss_mb(), time.perf_counter()
    ds = IndexedDataset(prefix)
    check_tokenizer(ds, load_tokenizer(tokenizer), cache_dir=os.path.dirname(prefix))
    t_open = time.perf_counter() - t0
    train, valid, _ = build_splits(ds, seq_len, [0.9, 0.1, 0.0], 1234, prefix)
    t1 = time.perf_counter()
    for g in range(64):
        train.sample(g)
    t_train = time.perf_counter() - t1
    t2 = time.perf_counter()
    ev = eval_batches(valid, 8, 8)
    t_eval = time.perf_counter() - t2
    return {"documents": len(ds), "tokens": ds.n_tokens, "open_s": t_open, "train_64_windows_s": t_train,
            "eval_64_windows_s": t_eval, "bytes_per_token": ev.bytes_per_token, "rss_added_mb": rss_mb() - rss0,
            "train_windows": len(train)}


if __name__ == "__main__":  # python -m tests.data.synthetic DIR N_DOCS [megams|megatron]
    out, n, fmt = sys.argv[1], int(float(sys.argv[2])), (sys.argv[3] if len(sys.argv) > 3 else "megams")
    prefix = os.path.join(out, f"{fmt}-{n}")
    t = time.perf_counter()
    tokens = (write_megams if fmt == "megams" else write_megatron)(prefix, n)
    print(f"wrote {prefix}: {n:,} documents, {tokens:,} tokens in {time.perf_counter() - t:.1f} s "
          f"(.idx {os.path.getsize(prefix + '.idx') / 2**20:.0f} MB)")
    r = open_cost(prefix)
    if fmt == "megatron":  # the second open: the id scan is cached
        r2 = open_cost(prefix)
        r["open_s_cached"] = r2["open_s"]
    print(json.dumps(r), f"maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


ROOT_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

"""Tokenize text sources into an indexed dataset, in parallel, in document order.

Documents are read streaming, grouped into chunks, and tokenized by a pool of worker processes (all
available CPUs by default), results taken in order (imap-like, with a bounded number of chunks in flight), so the
output is the same for any number of workers and memory stays flat however large the corpus (the
writer spills its index columns to disk too). The dataset is written under temporary names and moved
into place at the end (see `IndexedDatasetWriter`), in megams' layout or Megatron's (`format`).

Workers come from a forkserver (spawn where there is none), never a plain fork of the caller: the
caller is often a training process with torch, gloo and tqdm threads, and a fork of it can die in
its at-fork handlers ("terminate called ... No such process"). A worker that dies anyway ends the
run with a DataError naming the input, never a hang (a `ProcessPoolExecutor` reports a broken pool;
`multiprocessing.Pool` waits forever on the lost task).

`progress`: True (a tqdm bar of source bytes, with MB/s), False, or a callable
`progress(bytes_done, bytes_total)` (bytes_total None when unknown) called after every chunk of ~1 MiB.
`convert()` rewrites an indexed dataset into the other layout (Megatron -> megams decodes each document
to count its source bytes).
"""
from __future__ import annotations

import collections
import concurrent.futures
import itertools
import multiprocessing
import os
import signal
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from megams.data.corpus import builtin_corpus
from megams.data.errors import DataError
from megams.data.indexed import IndexedDataset, IndexedDatasetWriter
from megams.data.sources import read_documents
from megams.data.tokenizers import load_tokenizer

_CHUNK_BYTES = 1 << 20  # documents per task: about 1 MiB of text (large enough to hide the IPC cost)

_worker_tokenizer = None
_worker_append_eod = True


def _init_worker(tokenizer_spec: str, append_eod: bool) -> None:
    global _worker_tokenizer, _worker_append_eod
    _worker_tokenizer = load_tokenizer(tokenizer_spec)
    _worker_append_eod = append_eod


def _init_pool_worker(tokenizer_spec: str, append_eod: bool) -> None:
    # A forked worker inherits the parent's signal handlers (the trainer's preemption handler turns
    # SIGTERM into a flag): restore the default, or Pool.terminate() cannot end it and join() hangs.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _init_worker(tokenizer_spec, append_eod)


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask: a Slurm / container limit), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _encode_chunk(documents: List[str]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (all ids concatenated, tokens per document, UTF-8 bytes per document)."""
    tok = _worker_tokenizer
    extra = 1 if _worker_append_eod else 0
    encoded = [doc.encode("utf-8") for doc in documents]
    n_bytes = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
    if tok.name == "byte":  # the ids are the bytes: one join, no Python loop over tokens
        sep = bytes([tok.eod_id]) if extra else b""
        ids = np.frombuffer(sep.join(encoded) + sep, dtype=np.uint8)
        return ids, n_bytes + extra, n_bytes
    pieces = tok.sp.encode(list(documents), out_type=int) if hasattr(tok, "sp") else [tok.encode(d) for d in documents]
    if extra:
        for p in pieces:
            p.append(tok.eod_id)
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    ids = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int32, count=int(lengths.sum()))
    return ids, lengths, n_bytes


def _chunks(documents: Iterable[str]) -> Iterator[List[str]]:
    chunk, size = [], 0
    for doc in documents:
        chunk.append(doc)
        size += len(doc)
        if size >= _CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _ordered_map(pool, fn, items: Iterable, ahead: int) -> Iterator:
    """Like `pool.map(fn, items)` (results in order), but with at most `ahead` tasks in flight: map reads
    its whole input at once, and a corpus larger than memory must stream."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _pool_context():
    """A forkserver where the platform has one (workers forked from a clean server process that has
    imported this module once), else spawn."""
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])  # takes effect when the server starts (once per process)
        return ctx
    return multiprocessing.get_context("spawn")


def _start_pool(workers: int, tokenizer_spec: str, append_eod: bool):
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=_pool_context(),
                                                  initializer=_init_pool_worker,
                                                  initargs=(tokenizer_spec, append_eod))


class _Progress:
    """A tqdm bar (bytes, MB/s) or the caller's `progress(bytes_done, bytes_total)`."""

    def __init__(self, progress, total: Optional[int], desc: str = "tokenizing"):
        self.n, self.total = 0, total
        self.callback = progress if callable(progress) else None
        self.bar = None
        if progress is True:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc,
                            dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        if self.callback is not None:
            self.callback(self.n, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def preprocess_documents(documents: Iterable[str], output_prefix: str, tokenizer_spec: str = "byte",
                         workers: Optional[int] = None, append_eod: bool = True, source: str = "",
                         total_bytes: Optional[int] = None, progress=True, format: str = "megams"
                         ) -> IndexedDataset:
    """Tokenize `documents` (any iterable of strings) into OUTPUT_PREFIX.bin/.idx and open the result.
    `workers` None: all available CPUs."""
    workers = available_cpus() if workers is None else workers
    if workers < 1:
        raise DataError(f"workers: expected >= 1, got {workers}")
    tokenizer = load_tokenizer(tokenizer_spec)
    meta = {"tokenizer": tokenizer.name, "tokenizer_fingerprint": tokenizer.fingerprint,
            "eod_id": tokenizer.eod_id, "append_eod": append_eod, "source": source}
    chunks = _chunks(documents)
    pool = None
    if workers > 1:
        pool = _start_pool(workers, tokenizer_spec, append_eod)
        results = _ordered_map(pool, _encode_chunk, chunks, ahead=2 * workers)
    else:
        _init_worker(tokenizer_spec, append_eod)
        results = map(_encode_chunk, chunks)
    bar = _Progress(progress, total_bytes)
    try:
        with IndexedDatasetWriter(output_prefix, tokenizer.vocab_size, meta, format=format) as writer:
            try:
                for ids, lengths, n_bytes in results:
                    writer.add_documents(ids, lengths, n_bytes)
                    bar.update(int(n_bytes.sum()))
            except concurrent.futures.process.BrokenProcessPool as e:
                raise DataError(f"{source or output_prefix}: a tokenizer worker process died ({e}); "
                                f"nothing was written. Retry with workers=1 (data.num_workers=1 / "
                                f"--workers 1) to tokenize in this process") from None
            if writer.n_documents == 0:
                raise DataError(f"{source or output_prefix}: no documents to tokenize")
        if total_bytes:
            bar.update(max(0, total_bytes - bar.n))  # separators (blank lines, JSON) were counted out
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return IndexedDataset(output_prefix)


def preprocess(inputs: Optional[Sequence[str]], output_prefix: str, tokenizer_spec: str = "byte",
               workers: Optional[int] = None, append_eod: bool = True, doc_sep: str = "blank_line",
               text_key: str = "text", progress=True, format: str = "megams") -> IndexedDataset:
    """Tokenize text/JSONL files (`inputs`, in order; None = the built-in corpus) into an indexed dataset."""
    if inputs is None:
        corpus = builtin_corpus()
        return preprocess_documents(corpus.documents, output_prefix, tokenizer_spec, workers, append_eod,
                                    source=corpus.description, progress=progress, format=format,
                                    total_bytes=sum(len(d.encode("utf-8")) for d in corpus.documents))
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [os.fspath(p) for p in inputs]
    if not inputs:
        raise DataError("inputs: no input files given")
    readers = [read_documents(p, doc_sep=doc_sep, text_key=text_key) for p in inputs]  # checks every file now
    return preprocess_documents(itertools.chain.from_iterable(readers), output_prefix, tokenizer_spec, workers,
                                append_eod, source=", ".join(os.path.abspath(p) for p in inputs),
                                total_bytes=sum(os.path.getsize(p) for p in inputs), progress=progress,
                                format=format)


def convert(input_prefix: str, output_prefix: str, format: str, tokenizer_spec: Optional[str] = None,
            progress=True) -> IndexedDataset:
    """Rewrite an indexed dataset (either layout) in `format` ('megams' or 'megatron'), streaming.

    To megatron: the documents' ids as they are, one sequence per document. To megams: the tokenizer
    (`tokenizer_spec`; for a megams input, the one it records must be the same) is recorded, and a
    Megatron input's source bytes are counted by decoding each document (megams.data.megatron)."""
    from megams.data.indexed import check_tokenizer
    from megams.data.megatron import decoded_length

    src = IndexedDataset(input_prefix)
    if os.path.abspath(input_prefix) == os.path.abspath(output_prefix):
        raise DataError(f"--output-prefix {output_prefix}: the same as the input, expected a new prefix")
    if tokenizer_spec is None:
        if src.format == "megatron" and format == "megams":
            raise DataError(f"--tokenizer: converting the Megatron dataset {input_prefix} to megams needs the "
                            "tokenizer it was made with ('byte' or a sentencepiece .model file)")
        tokenizer = None
    else:
        tokenizer = load_tokenizer(tokenizer_spec)
        check_tokenizer(src, tokenizer)
    vocab = tokenizer.vocab_size if tokenizer else src.meta["vocab_size"]
    if src.format == "megatron":
        meta = {"tokenizer": tokenizer.name, "tokenizer_fingerprint": tokenizer.fingerprint,
                "eod_id": tokenizer.eod_id, "append_eod": None,
                "source": f"Megatron dataset {os.path.abspath(input_prefix)} (source bytes: decoded)"} if tokenizer else {}
    else:
        meta = {k: v for k, v in src.meta.items() if k not in ("n_documents", "n_tokens", "source_bytes")}
    n = len(src)
    bar = _Progress(progress, src.n_tokens * src.dtype.itemsize, desc="converting")
    try:
        with IndexedDatasetWriter(output_prefix, vocab, meta, format=format) as writer:
            step = 1 << 16
            for a in range(0, n, step):
                b = min(n, a + step)
                if src.format == "megatron":
                    starts = src.doc_starts(a, b)
                else:
                    starts = np.asarray(src.doc_offsets[a:b + 1])
                ids = np.asarray(src.tokens[int(starts[0]):int(starts[-1])])
                lengths = np.diff(starts)
                if src.format == "megams":
                    n_bytes = np.diff(np.asarray(src.cum_bytes[a:b + 1]))
                elif format == "megams":
                    rel = starts - starts[0]
                    n_bytes = [decoded_length(tokenizer, ids[rel[i]:rel[i + 1]]) for i in range(b - a)]
                else:
                    n_bytes = np.zeros(b - a, np.int64)
                writer.add_documents(ids, lengths, n_bytes, checked=src.format == "megams")
                bar.update(ids.nbytes)
    finally:
        bar.close()
    return IndexedDataset(output_prefix)

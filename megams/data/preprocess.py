"""Tokenize text sources into an indexed dataset, in parallel, in document order.

Documents are read streaming, grouped into chunks, and tokenized by a Pool of workers, results taken in
order (imap-like, with a bounded number of chunks in flight), so the output is the same for any number
of workers and memory stays flat however large the corpus. The dataset is written under
temporary names and moved into place at the end (see `IndexedDatasetWriter`).
"""
from __future__ import annotations

import collections
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


def _encode_chunk(documents: List[str]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (all ids concatenated, tokens per document, UTF-8 bytes per document)."""
    tok = _worker_tokenizer
    eod = [tok.eod_id] if _worker_append_eod else []
    ids, lengths, n_bytes = [], [], []
    for doc in documents:
        doc_ids = tok.encode(doc) + eod
        ids.extend(doc_ids)
        lengths.append(len(doc_ids))
        n_bytes.append(len(doc.encode("utf-8")))
    return np.asarray(ids, dtype=np.int64), np.asarray(lengths, dtype=np.int64), np.asarray(n_bytes, dtype=np.int64)


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
    """Like `pool.imap(fn, items)` (results in order), but with at most `ahead` tasks in flight: imap reads
    its whole input at once, and a corpus larger than memory must stream."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _pool_context():
    # fork where it exists: workers start in milliseconds and need nothing re-imported; they only run
    # the tokenizer (no torch, no threads of their own).
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def preprocess_documents(documents: Iterable[str], output_prefix: str, tokenizer_spec: str = "byte",
                         workers: int = 1, append_eod: bool = True, source: str = "",
                         total_bytes: Optional[int] = None, progress: bool = True) -> IndexedDataset:
    """Tokenize `documents` (any iterable of strings) into OUTPUT_PREFIX.bin/.idx and open the result."""
    from tqdm import tqdm

    if workers < 1:
        raise DataError(f"workers: expected >= 1, got {workers}")
    tokenizer = load_tokenizer(tokenizer_spec)
    meta = {"tokenizer": tokenizer.name, "tokenizer_fingerprint": tokenizer.fingerprint,
            "eod_id": tokenizer.eod_id, "append_eod": append_eod, "source": source}
    chunks = _chunks(documents)
    pool = None
    if workers > 1:  # started before tqdm's monitor thread exists: a clean fork
        pool = _pool_context().Pool(workers, initializer=_init_pool_worker, initargs=(tokenizer_spec, append_eod))
        results = _ordered_map(pool, _encode_chunk, chunks, ahead=2 * workers)
    else:
        _init_worker(tokenizer_spec, append_eod)
        results = map(_encode_chunk, chunks)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress,
               dynamic_ncols=True)
    try:
        with IndexedDatasetWriter(output_prefix, tokenizer.vocab_size, meta) as writer:
            for ids, lengths, n_bytes in results:
                writer.add_documents(ids, lengths, n_bytes)
                bar.update(int(n_bytes.sum()))
            if writer.n_documents == 0:
                raise DataError(f"{source or output_prefix}: no documents to tokenize")
        if total_bytes:
            bar.update(max(0, total_bytes - bar.n))  # separators (blank lines, JSON) were counted out
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    return IndexedDataset(output_prefix)


def preprocess(inputs: Optional[Sequence[str]], output_prefix: str, tokenizer_spec: str = "byte", workers: int = 1,
               append_eod: bool = True, doc_sep: str = "blank_line", text_key: str = "text",
               progress: bool = True) -> IndexedDataset:
    """Tokenize text/JSONL files (`inputs`, in order; None = the built-in corpus) into an indexed dataset."""
    if inputs is None:
        corpus = builtin_corpus()
        return preprocess_documents(corpus.documents, output_prefix, tokenizer_spec, workers, append_eod,
                                    source=corpus.description, progress=progress,
                                    total_bytes=sum(len(d.encode("utf-8")) for d in corpus.documents))
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [os.fspath(p) for p in inputs]
    if not inputs:
        raise DataError("inputs: no input files given")
    readers = [read_documents(p, doc_sep=doc_sep, text_key=text_key) for p in inputs]  # checks every file now
    return preprocess_documents(itertools.chain.from_iterable(readers), output_prefix, tokenizer_spec, workers,
                                append_eod, source=", ".join(os.path.abspath(p) for p in inputs),
                                total_bytes=sum(os.path.getsize(p) for p in inputs), progress=progress)

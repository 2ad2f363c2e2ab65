"""Memory-mapped indexed dataset: PREFIX.bin (token ids) + PREFIX.idx (document index + metadata).

PREFIX.bin  every document's token ids, concatenated; dtype uint8 (vocab <= 256), uint16 (<= 65536)
            or int32, little-endian.
PREFIX.idx  header  "<8sIIQQ": magic b"MEGAMSID", version (1), dtype code (1 uint8, 2 uint16, 3 int32),
                    number of documents n, length in bytes of the metadata block
            int64[n + 1]  document token offsets into .bin (0, ..., total tokens)
            int64[n]      UTF-8 bytes of each source document (bits-per-byte is exact, whatever the tokenizer)
            metadata      JSON: tokenizer name + fingerprint, vocab_size, eod_id, append_eod, source, ...

Opening checks the magic, the version, that the dtype can hold the recorded vocabulary, and that the sizes
agree with each other and with the .bin length, so a truncated or foreign file fails at once with a DataError
naming it. Token ids are checked against the vocabulary when windows are read (`GPTDataset.window`).
"""
from __future__ import annotations

import array
import json
import os
import struct
from typing import Optional, Sequence

import numpy as np

from megams.data.errors import DataError

MAGIC = b"MEGAMSID"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQ")
_DTYPES = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 3: np.dtype("<i4")}
_CODES = {dt: code for code, dt in _DTYPES.items()}


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    if vocab_size <= 1 << 8:
        return _DTYPES[1]
    if vocab_size <= 1 << 16:
        return _DTYPES[2]
    if vocab_size <= 1 << 31:
        return _DTYPES[3]
    raise DataError(f"vocab_size={vocab_size} is too large for an indexed dataset (at most 2**31)")


def exists(prefix: str) -> bool:
    return os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")


class IndexedDatasetWriter:
    """Append documents, then `finalize()`. Files are written under temporary names and moved into place
    with os.replace (.bin first, .idx last), so a crash never leaves a dataset that looks complete.

        with IndexedDatasetWriter(prefix, vocab_size, meta) as w:
            w.add_document(ids, source_bytes)
    """

    def __init__(self, prefix: str, vocab_size: int, meta: Optional[dict] = None):
        self.prefix = prefix
        self.vocab_size = vocab_size
        self.dtype = dtype_for_vocab(vocab_size)
        self.meta = dict(meta or {}, vocab_size=vocab_size)
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        tag = f".tmp-{os.getpid()}"
        self._bin_tmp, self._idx_tmp = prefix + ".bin" + tag, prefix + ".idx" + tag
        self._bin = open(self._bin_tmp, "wb")
        self._offsets = array.array("q", [0])  # compact: corpora have millions of documents
        self._bytes = array.array("q")
        self._done = False

    def add_document(self, ids: Sequence[int], source_bytes: int = 0) -> None:
        arr = np.asarray(ids)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size}) in document {len(self._bytes)}")
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes())
        self._offsets.append(self._offsets[-1] + arr.size)
        self._bytes.append(int(source_bytes))

    def add_documents(self, flat_ids: np.ndarray, lengths: Sequence[int], source_bytes: Sequence[int]) -> None:
        """Many documents at once: their ids concatenated, plus each one's length and source bytes."""
        flat_ids = np.asarray(flat_ids)
        if flat_ids.size and (flat_ids.min() < 0 or flat_ids.max() >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size}) after document {len(self._bytes)}")
        self._bin.write(flat_ids.astype(self.dtype, copy=False).tobytes())
        self._offsets.extend((self._offsets[-1] + np.cumsum(np.asarray(lengths, dtype=np.int64))).tolist())
        self._bytes.extend(np.asarray(source_bytes, dtype=np.int64).tolist())

    @property
    def n_documents(self) -> int:
        return len(self._bytes)

    def finalize(self) -> "IndexedDataset":
        self._bin.close()
        offsets = np.frombuffer(self._offsets, dtype=np.int64).astype("<i8")
        doc_bytes = np.frombuffer(self._bytes, dtype=np.int64).astype("<i8")
        meta = dict(self.meta, n_documents=len(doc_bytes), n_tokens=int(offsets[-1]),
                    source_bytes=int(doc_bytes.sum()))
        blob = json.dumps(meta, sort_keys=True).encode("utf-8")
        with open(self._idx_tmp, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, _CODES[self.dtype], len(doc_bytes), len(blob)))
            f.write(offsets.tobytes())
            f.write(doc_bytes.tobytes())
            f.write(blob)
        os.replace(self._bin_tmp, self.prefix + ".bin")
        os.replace(self._idx_tmp, self.prefix + ".idx")
        self._done = True
        return IndexedDataset(self.prefix)

    def abort(self) -> None:
        self._bin.close()
        for p in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(p):
                os.remove(p)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.finalize()


class IndexedDataset:
    """Read-only view of PREFIX.bin/.idx: `len(ds)` documents, `ds.doc(i)`, the flat memory-mapped `ds.tokens`,
    `ds.doc_offsets`, `ds.doc_bytes` and the metadata dict `ds.meta`."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        idx_path, bin_path = prefix + ".idx", prefix + ".bin"
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                raise DataError(f"{p}: no such file (an indexed dataset needs PREFIX.bin and PREFIX.idx)")
        with open(idx_path, "rb") as f:
            raw = f.read()
        if len(raw) < _HEADER.size or raw[:8] != MAGIC:
            raise DataError(f"{idx_path}: not a megams index file (bad magic), expected one written by "
                            "tools/preprocess_data.py")
        _, version, code, n, meta_len = _HEADER.unpack_from(raw)
        if version != VERSION:
            raise DataError(f"{idx_path}: index format version {version}, this megams reads version {VERSION}")
        if code not in _DTYPES:
            raise DataError(f"{idx_path}: corrupted index (unknown dtype code {code})")
        expected = _HEADER.size + 8 * (n + 1) + 8 * n + meta_len
        if len(raw) != expected:
            raise DataError(f"{idx_path}: truncated or corrupted index ({len(raw)} bytes, the header says {expected})")
        pos = _HEADER.size
        self.doc_offsets = np.frombuffer(raw, "<i8", n + 1, pos)
        self.doc_bytes = np.frombuffer(raw, "<i8", n, pos + 8 * (n + 1))
        try:
            self.meta = json.loads(raw[expected - meta_len:].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise DataError(f"{idx_path}: corrupted index (metadata is not JSON)") from None
        if self.doc_offsets[0] != 0 or np.any(np.diff(self.doc_offsets) < 0):
            raise DataError(f"{idx_path}: corrupted index (document offsets are not increasing from 0)")
        self.dtype = _DTYPES[code]
        vocab = self.meta.get("vocab_size") if isinstance(self.meta, dict) else None
        if isinstance(vocab, int) and self.dtype.kind == "u" and vocab > 1 << (8 * self.dtype.itemsize):
            raise DataError(f"{idx_path}: dtype mismatch: {self.dtype.name} tokens cannot hold the vocab_size={vocab} "
                            f"its metadata records (expected {dtype_for_vocab(vocab).name})")
        n_tokens = int(self.doc_offsets[-1])
        bin_size = os.path.getsize(bin_path)
        if bin_size != n_tokens * self.dtype.itemsize:
            other = [dt for dt in _DTYPES.values() if dt != self.dtype and bin_size == n_tokens * dt.itemsize > 0]
            if other:  # the sizes agree for another dtype: an index written for another .bin, or an edited header
                raise DataError(f"{idx_path}: dtype mismatch: the index says {self.dtype.name} tokens, but {bin_path} "
                                f"holds {bin_size} bytes = {n_tokens} tokens of {other[0].name} (expected the .idx "
                                "written together with this .bin)")
            raise DataError(f"{bin_path}: truncated or corrupted ({bin_size} bytes, the index says {n_tokens} tokens "
                            f"of {self.dtype.itemsize} byte(s) = {n_tokens * self.dtype.itemsize})")
        # np.memmap refuses empty files
        self.tokens = np.memmap(bin_path, self.dtype, "r") if n_tokens else np.zeros(0, self.dtype)
        self._cum_bytes = np.concatenate([[0], np.cumsum(self.doc_bytes)])

    def __len__(self) -> int:
        return len(self.doc_bytes)

    @property
    def n_tokens(self) -> int:
        return int(self.doc_offsets[-1])

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.doc_offsets[i]:self.doc_offsets[i + 1]]

    def source_bytes_before(self, positions) -> np.ndarray:
        """Source bytes that the tokens before each stream position stand for: exact at document boundaries,
        linear inside a document (its bytes spread evenly over its tokens, end-of-document included)."""
        pos = np.asarray(positions, dtype=np.int64)
        if len(self) == 0:
            return np.zeros(pos.shape)
        d = np.clip(np.searchsorted(self.doc_offsets, pos, side="right") - 1, 0, len(self) - 1)
        start, length = self.doc_offsets[d], np.diff(self.doc_offsets)[d]
        inside = np.where(length > 0, (pos - start) / np.maximum(length, 1), 0.0)
        return self._cum_bytes[d] + self.doc_bytes[d] * inside

    def __repr__(self) -> str:
        return f"IndexedDataset({self.prefix!r}: {len(self)} documents, {self.n_tokens} tokens, {self.dtype})"


def check_tokenizer(dataset: IndexedDataset, tokenizer) -> None:
    """A dataset is only read with the tokenizer that wrote it (same vocabulary, same ids)."""
    meta = dataset.meta
    fingerprint, vocab = meta.get("tokenizer_fingerprint"), meta.get("vocab_size")
    if fingerprint != tokenizer.fingerprint or vocab != tokenizer.vocab_size:
        raise DataError(f"{dataset.prefix}.idx: tokenized with {meta.get('tokenizer', '?')} (vocab_size={vocab}, "
                        f"fingerprint {_short_fp(fingerprint)}), but the tokenizer is {tokenizer.name} "
                        f"(vocab_size={tokenizer.vocab_size}, fingerprint {_short_fp(tokenizer.fingerprint)})")


def _short_fp(fp) -> str:
    fp = str(fp)
    return fp[:len("sentencepiece:") + 12] if fp.startswith("sentencepiece:") else fp

"""Memory-mapped indexed datasets: PREFIX.bin (token ids) + PREFIX.idx (document index + metadata).

Two layouts are read, told apart by the first bytes of the .idx:

- megams (`MEGAMSID`, written by tools/preprocess_data.py):
  PREFIX.bin  every document's token ids, concatenated; dtype uint8 (vocab <= 256), uint16 (<= 65536)
              or int32, little-endian.
  PREFIX.idx  header  "<8sIIQQ": magic b"MEGAMSID", version (2), dtype code (1 uint8, 2 uint16, 3 int32),
                      number of documents n, length in bytes of the metadata block
              int64[n + 1]  document token offsets into .bin (0, ..., total tokens)
              int64[n + 1]  cumulative UTF-8 bytes of the source documents (0, ..., total bytes): the bytes
                            any token range stands for in O(1), for exact bits per byte whatever the tokenizer
              metadata      JSON: tokenizer name + fingerprint, vocab_size, eod_id, append_eod, source, ...
  Version 1 (per-document bytes instead of their prefix sum) is still read; its prefix sum is then
  computed in memory (16 bytes a document): re-tokenize or convert to get version 2.
- Megatron-LM / GPT-NeoX (`MMIDIDX\\x00\\x00`), see `megams.data.megatron`.

Nothing is read whole: the arrays are memory-mapped and only the pages a lookup touches are read, so
opening a dataset of 100M documents costs milliseconds and no memory (docs/DATA.md has the numbers).
Opening checks the magic, the version, that the dtype can hold the recorded vocabulary, and that the
sizes agree with each other and with the .bin length, so a truncated or foreign file fails at once with
a DataError naming it. Token ids are checked against the vocabulary when windows are read
(`GPTDataset.window`).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from typing import Optional, Sequence

import numpy as np

from megams.data.errors import DataError

MAGIC = b"MEGAMSID"
VERSION = 2
_HEADER = struct.Struct("<8sIIQQ")
_DTYPES = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 3: np.dtype("<i4")}
_CODES = {dt: code for code, dt in _DTYPES.items()}
MEGATRON_MAGIC = b"MMIDIDX\x00\x00"


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


def index_format(prefix: str) -> str:
    """'megams', 'megatron' or 'unknown', from the first bytes of PREFIX.idx."""
    with open(prefix + ".idx", "rb") as f:
        head = f.read(len(MEGATRON_MAGIC))
    if head[:len(MAGIC)] == MAGIC:
        return "megams"
    return "megatron" if head == MEGATRON_MAGIC else "unknown"


def memmap(path: str, dtype, offset: int, count: int) -> np.ndarray:
    """`count` items of `dtype` at byte `offset` of `path`, memory-mapped (an empty array for 0)."""
    if count == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


class PositionalFile:
    """Reads by `os.pread` into fresh buffers: the lookups of the data path (windows, per-window source bytes,
    binary searches in the index) go through this, not through the memory maps, because every page touched
    in a map stays in the process's resident set (a whole page-cache folio, up to 2 MB, on recent kernels):
    a long run reading random windows would otherwise grow its RSS towards the size of the dataset."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)

    def array(self, dtype, offset: int, count: int) -> np.ndarray:
        dtype = np.dtype(dtype)
        n = count * dtype.itemsize
        raw = os.pread(self.fd, n, offset) if n else b""
        if len(raw) != n:
            raise DataError(f"{self.path}: truncated or corrupted (short read of {n} bytes at byte {offset})")
        return np.frombuffer(raw, dtype)

    def int64(self, offset: int) -> int:
        raw = os.pread(self.fd, 8, offset)
        if len(raw) != 8:
            raise DataError(f"{self.path}: truncated or corrupted (short read at byte {offset})")
        return int.from_bytes(raw, "little", signed=True)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


class _Column:
    """A growing int64 column spilled to a temporary file: a writer's memory stays flat however many
    documents it takes (buffered in blocks of 1M values)."""

    def __init__(self, path: str, dtype="<i8"):
        self.path, self.dtype = path, np.dtype(dtype)
        self._f = open(path, "wb")
        self._buf: list = []
        self._n_buf = 0
        self.count = 0

    def extend(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=self.dtype)
        self._buf.append(values)
        self._n_buf += values.size
        self.count += values.size
        if self._n_buf >= 1 << 20:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            self._f.write(np.concatenate(self._buf).tobytes())
            self._buf, self._n_buf = [], 0

    def close(self) -> None:
        self.flush()
        self._f.close()

    def copy_to(self, out) -> None:
        self.close()
        with open(self.path, "rb") as f:
            shutil.copyfileobj(f, out, 1 << 22)

    def remove(self) -> None:
        if not self._f.closed:
            self._f.close()
        if os.path.exists(self.path):
            os.remove(self.path)


class IndexedDatasetWriter:
    """Append documents, then `finalize()`. Files are written under temporary names and moved into place
    with os.replace (.bin first, .idx last), so a crash never leaves a dataset that looks complete.
    Memory stays flat: the index columns are spilled to temporary files as documents arrive.

        with IndexedDatasetWriter(prefix, vocab_size, meta) as w:
            w.add_document(ids, source_bytes)

    `format="megatron"` writes the Megatron-LM / GPT-NeoX layout instead (no metadata, no source bytes:
    see `megams.data.megatron`).
    """

    def __init__(self, prefix: str, vocab_size: int, meta: Optional[dict] = None, format: str = "megams"):
        if format not in ("megams", "megatron"):
            raise DataError(f"format: expected 'megams' or 'megatron', got {format!r}")
        self.prefix, self.format = prefix, format
        self.vocab_size = vocab_size
        if format == "megatron":
            from megams.data.megatron import megatron_dtype
            self.dtype = megatron_dtype(vocab_size)
        else:
            self.dtype = dtype_for_vocab(vocab_size)
        self.meta = dict(meta or {}, vocab_size=vocab_size)
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        tag = f".tmp-{os.getpid()}"
        self._bin_tmp, self._idx_tmp = prefix + ".bin" + tag, prefix + ".idx" + tag
        self._bin = open(self._bin_tmp, "wb")
        self._offsets = _Column(prefix + ".offsets" + tag)   # token offset of each document's end
        self._cum_bytes = _Column(prefix + ".bytes" + tag)   # source bytes up to each document's end
        self._n_tokens = 0
        self._n_bytes = 0
        self._max_len = 0
        self._done = False

    def add_document(self, ids: Sequence[int], source_bytes: int = 0) -> None:
        arr = np.asarray(ids)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size}) in document {self.n_documents}")
        self.add_documents(arr, [arr.size], [source_bytes], checked=True)

    def add_documents(self, flat_ids: np.ndarray, lengths: Sequence[int], source_bytes: Sequence[int],
                      checked: bool = False) -> None:
        """Many documents at once: their ids concatenated, plus each one's length and source bytes."""
        flat_ids = np.asarray(flat_ids)
        if not checked and flat_ids.size and (flat_ids.min() < 0 or flat_ids.max() >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size}) after document {self.n_documents}")
        lengths = np.asarray(lengths, dtype=np.int64)
        self._bin.write(flat_ids.astype(self.dtype, copy=False).tobytes())
        if lengths.size:
            self._max_len = max(self._max_len, int(lengths.max()))
        ends = self._n_tokens + np.cumsum(lengths)
        cum = self._n_bytes + np.cumsum(np.asarray(source_bytes, dtype=np.int64))
        self._offsets.extend(ends)
        self._cum_bytes.extend(cum)
        if lengths.size:
            self._n_tokens, self._n_bytes = int(ends[-1]), int(cum[-1])

    @property
    def n_documents(self) -> int:
        return self._offsets.count

    def finalize(self) -> "IndexedDataset":
        self._bin.close()
        n = self.n_documents
        with open(self._idx_tmp, "wb") as f:
            if self.format == "megatron":
                from megams.data.megatron import write_megatron_index
                write_megatron_index(f, self.dtype, self._offsets, self._max_len)
            else:
                meta = dict(self.meta, n_documents=n, n_tokens=self._n_tokens, source_bytes=self._n_bytes)
                blob = json.dumps(meta, sort_keys=True).encode("utf-8")
                f.write(_HEADER.pack(MAGIC, VERSION, _CODES[self.dtype], n, len(blob)))
                zero = np.zeros(1, "<i8").tobytes()
                f.write(zero)
                self._offsets.copy_to(f)
                f.write(zero)
                self._cum_bytes.copy_to(f)
                f.write(blob)
        self._offsets.remove()
        self._cum_bytes.remove()
        os.replace(self._bin_tmp, self.prefix + ".bin")
        os.replace(self._idx_tmp, self.prefix + ".idx")
        self._done = True
        return IndexedDataset(self.prefix)

    def abort(self) -> None:
        self._bin.close()
        self._offsets.remove()
        self._cum_bytes.remove()
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
    `ds.doc_offsets`, `ds.cum_bytes` (memory-mapped), and the metadata dict `ds.meta`.

    `IndexedDataset(prefix)` on a Megatron-LM / GPT-NeoX dataset returns a `MegatronIndexedDataset`
    (the same interface; see megams.data.megatron)."""

    format = "megams"

    def __new__(cls, prefix: str):
        if cls is IndexedDataset and exists(prefix) and index_format(prefix) == "megatron":
            from megams.data.megatron import MegatronIndexedDataset
            return object.__new__(MegatronIndexedDataset)
        return object.__new__(cls)

    def __init__(self, prefix: str):
        self.prefix = prefix
        idx_path, bin_path = prefix + ".idx", prefix + ".bin"
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                raise DataError(f"{p}: no such file (an indexed dataset needs PREFIX.bin and PREFIX.idx)")
        idx_size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            head = f.read(_HEADER.size)
        if len(head) < _HEADER.size or head[:8] != MAGIC:
            raise DataError(f"{idx_path}: not a megams index file (bad magic), expected one written by "
                            "tools/preprocess_data.py")
        _, version, code, n, meta_len = _HEADER.unpack_from(head)
        if version not in (1, VERSION):
            raise DataError(f"{idx_path}: index format version {version}, this megams reads versions 1 and {VERSION}")
        if code not in _DTYPES:
            raise DataError(f"{idx_path}: corrupted index (unknown dtype code {code})")
        bytes_entries = n + 1 if version == 2 else n
        expected = _HEADER.size + 8 * (n + 1) + 8 * bytes_entries + meta_len
        if idx_size != expected:
            raise DataError(f"{idx_path}: truncated or corrupted index ({idx_size} bytes, the header says {expected})")
        pos = _HEADER.size
        self.doc_offsets = memmap(idx_path, "<i8", pos, n + 1)
        pos += 8 * (n + 1)
        if version == 2:
            self.cum_bytes = memmap(idx_path, "<i8", pos, n + 1)
        else:  # version 1: per-document bytes; their prefix sum in memory
            self.cum_bytes = np.concatenate([[0], np.cumsum(memmap(idx_path, "<i8", pos, n))]).astype(np.int64)
        pos += 8 * bytes_entries
        with open(idx_path, "rb") as f:
            f.seek(pos)
            blob = f.read(meta_len)
        try:
            self.meta = json.loads(blob.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise DataError(f"{idx_path}: corrupted index (metadata is not JSON)") from None
        if not isinstance(self.meta, dict):
            raise DataError(f"{idx_path}: corrupted index (metadata is not a JSON object)")
        n_tokens = int(self.doc_offsets[-1])
        # O(1) checks only (the first and last entries); a document range is checked when read
        if self.doc_offsets[0] != 0 or n_tokens < 0 or self.cum_bytes[0] != 0 or self.cum_bytes[-1] < 0:
            raise DataError(f"{idx_path}: corrupted index (document offsets are not increasing from 0)")
        self.dtype = _DTYPES[code]
        vocab = self.meta.get("vocab_size")
        if isinstance(vocab, int) and self.dtype.kind == "u" and vocab > 1 << (8 * self.dtype.itemsize):
            raise DataError(f"{idx_path}: dtype mismatch: {self.dtype.name} tokens cannot hold the vocab_size={vocab} "
                            f"its metadata records (expected {dtype_for_vocab(vocab).name})")
        bin_size = os.path.getsize(bin_path)
        if bin_size != n_tokens * self.dtype.itemsize:
            other = [dt for dt in _DTYPES.values() if dt != self.dtype and bin_size == n_tokens * dt.itemsize > 0]
            if other:  # the sizes agree for another dtype: an index written for another .bin, or an edited header
                raise DataError(f"{idx_path}: dtype mismatch: the index says {self.dtype.name} tokens, but {bin_path} "
                                f"holds {bin_size} bytes = {n_tokens} tokens of {other[0].name} (expected the .idx "
                                "written together with this .bin)")
            raise DataError(f"{bin_path}: truncated or corrupted ({bin_size} bytes, the index says {n_tokens} tokens "
                            f"of {self.dtype.itemsize} byte(s) = {n_tokens * self.dtype.itemsize})")
        self.tokens = memmap(bin_path, self.dtype, 0, n_tokens)  # bulk access; lookups use pread (below)
        self._n_docs, self._n_tokens = n, n_tokens
        self._idx, self._bin = PositionalFile(idx_path), PositionalFile(bin_path)
        self._offsets_at = _HEADER.size
        self._cum_at = _HEADER.size + 8 * (n + 1) if version == 2 else None

    def __len__(self) -> int:
        return self._n_docs

    def read_tokens(self, a: int, b: int) -> np.ndarray:
        """Tokens [a, b) of the stream (clipped to it), read with pread: nothing stays mapped."""
        a, b = max(0, a), min(b, self._n_tokens)
        return self._bin.array(self.dtype, a * self.dtype.itemsize, max(0, b - a))

    def _offset(self, i: int) -> int:
        return self._idx.int64(self._offsets_at + 8 * i)

    def _cum(self, i: int) -> int:
        return self._idx.int64(self._cum_at + 8 * i) if self._cum_at is not None else int(self.cum_bytes[i])

    def _doc_of(self, pos: int) -> int:
        """The last document starting at or before token `pos`: a binary search, ~log2(n) 8-byte preads."""
        lo, hi = 0, self._n_docs - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._offset(mid) <= pos:
                lo = mid
            else:
                hi = mid - 1
        return lo

    @property
    def n_tokens(self) -> int:
        return self._n_tokens

    @property
    def source_bytes(self) -> Optional[int]:
        """UTF-8 bytes of all source documents (None where the layout does not store them)."""
        return int(self.cum_bytes[-1])

    @property
    def doc_bytes(self) -> np.ndarray:
        """Bytes of each source document (reads the whole column: for tests and small datasets)."""
        return np.diff(np.asarray(self.cum_bytes))

    def doc_start(self, i: int) -> int:
        return self._offset(i)

    def doc(self, i: int) -> np.ndarray:
        a, b = self._offset(i), self._offset(i + 1)
        if not 0 <= a <= b <= self.n_tokens:
            raise DataError(f"{self.prefix}.idx: corrupted index (document {i} spans tokens [{a}, {b}) of "
                            f"{self.n_tokens})")
        return self.read_tokens(a, b)

    def source_bytes_before(self, positions) -> np.ndarray:
        """Source bytes that the tokens before each stream position stand for: exact at document boundaries,
        linear inside a document (its bytes spread evenly over its tokens, end-of-document included).
        O(log documents) a position: a binary search in the offsets, two prefix-sum reads (all preads)."""
        pos = np.asarray(positions, dtype=np.int64)
        if len(self) == 0:
            return np.zeros(pos.shape)
        out = np.empty(pos.shape, dtype=np.float64)
        for k, p in enumerate(pos.ravel()):
            d = self._doc_of(int(p))
            start, stop = self._offset(d), self._offset(d + 1)
            before, after = self._cum(d), self._cum(d + 1)
            inside = (int(p) - start) / (stop - start) if stop > start else 0.0
            out.flat[k] = before + (after - before) * inside
        return out

    def __repr__(self) -> str:
        return f"IndexedDataset({self.prefix!r}: {len(self)} documents, {self.n_tokens} tokens, {self.dtype})"


def check_tokenizer(dataset: IndexedDataset, tokenizer, cache_dir: Optional[str] = None) -> None:
    """A dataset is only read with the tokenizer that wrote it (same vocabulary, same ids). A Megatron
    dataset records no tokenizer: its largest id is checked against the vocabulary instead (once, cached
    in `cache_dir`), and the tokenizer is attached to it for decoding (bits per byte)."""
    if dataset.format == "megatron":
        dataset.use_tokenizer(tokenizer, cache_dir)
        return
    meta = dataset.meta
    fingerprint, vocab = meta.get("tokenizer_fingerprint"), meta.get("vocab_size")
    if fingerprint != tokenizer.fingerprint or vocab != tokenizer.vocab_size:
        raise DataError(f"{dataset.prefix}.idx: tokenized with {meta.get('tokenizer', '?')} (vocab_size={vocab}, "
                        f"fingerprint {_short_fp(fingerprint)}), but the tokenizer is {tokenizer.name} "
                        f"(vocab_size={tokenizer.vocab_size}, fingerprint {_short_fp(tokenizer.fingerprint)})")


def _short_fp(fp) -> str:
    fp = str(fp)
    return fp[:len("sentencepiece:") + 12] if fp.startswith("sentencepiece:") else fp

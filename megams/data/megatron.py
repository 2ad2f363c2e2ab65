"""Megatron-LM / GPT-NeoX indexed datasets (`MMIDIDX`), read as they are and written too.

The layout (megatron/core/datasets/indexed_dataset.py; GPT-NeoX uses the same):

    PREFIX.idx  b"MMIDIDX\\x00\\x00"  version <Q (1)  dtype code <B  sequence count S <Q  document count D <Q
                int32[S] sequence lengths (tokens)   int64[S] sequence pointers (byte offsets into .bin)
                int64[D] document indices (the first sequence of each document; 0, ..., S)
    PREFIX.bin  the token ids of every sequence; dtype codes 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
                8 uint16 (6 / 7, float64 / float32, are not token ids and are refused)

A document is its sequences, in order; megams reads the token stream (every document in order), so it
needs the sequences stored back to back (pointer of sequence k + 1 = pointer of k + length of k, as every
Megatron / NeoX writer does), which is checked once with the largest id (`scan`, cached).

The format stores neither the tokenizer nor the source text: `data.tokenizer` says which tokenizer made
it, its vocabulary is checked against the data's largest id, and bits per byte count the UTF-8 bytes
of the *decoded* documents (`tokenizer.decode`, exact for the byte tokenizer and for the lossless
sentencepiece models of tools/train_tokenizer.py; for a normalising tokenizer, the bytes of the
normalised text).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Optional

import numpy as np

from megams.data.errors import DataError
from megams.data.indexed import MEGATRON_MAGIC, IndexedDataset, PositionalFile, exists, memmap

_HEADER = struct.Struct("<9sQBQQ")  # 34 bytes
DTYPES = {1: np.dtype("<u1"), 2: np.dtype("<i1"), 3: np.dtype("<i2"), 4: np.dtype("<i4"), 5: np.dtype("<i8"),
          6: np.dtype("<f8"), 7: np.dtype("<f4"), 8: np.dtype("<u2")}
CODES = {dt: code for code, dt in DTYPES.items()}
_CHUNK = 1 << 20  # items a scan reads at once (bounded memory, no memory map kept resident)


def megatron_dtype(vocab_size: int) -> np.dtype:
    """Megatron's own choice (`DType.optimal_dtype`): uint16 below 65500 ids, else int32."""
    return np.dtype("<u2") if vocab_size < 65500 else np.dtype("<i4")


def write_megatron_index(f, dtype: np.dtype, ends, max_len: int) -> None:
    """Write the .idx of documents of one sequence each, from the spilled column of document end offsets
    (`indexed._Column`), streaming."""
    if max_len >= 1 << 31:
        raise DataError(f"format megatron: a document of {max_len} tokens does not fit its int32 sequence lengths")
    ends.close()
    n = ends.count
    f.write(_HEADER.pack(MEGATRON_MAGIC, 1, CODES[np.dtype(dtype)], n, n + 1))

    def chunks():
        prev = 0
        with open(ends.path, "rb") as src:
            while True:
                e = np.fromfile(src, "<i8", _CHUNK)
                if not e.size:
                    return
                starts = np.concatenate([[prev], e[:-1]])
                prev = int(e[-1])
                yield starts, e

    for starts, e in chunks():
        f.write((e - starts).astype("<i4").tobytes())
    for starts, _ in chunks():
        f.write((starts * np.dtype(dtype).itemsize).astype("<i8").tobytes())
    for a in range(0, n + 1, _CHUNK):
        f.write(np.arange(a, min(n + 1, a + _CHUNK), dtype="<i8").tobytes())


class MegatronIndexedDataset(IndexedDataset):
    """A Megatron-LM / GPT-NeoX dataset behind IndexedDataset's interface. Opening reads the 34-byte header
    and memory-maps the arrays (O(1)); `use_tokenizer` (via `check_tokenizer`) checks the ids once."""

    format = "megatron"

    def __init__(self, prefix: str):
        self.prefix = prefix
        idx_path, bin_path = prefix + ".idx", prefix + ".bin"
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                raise DataError(f"{p}: no such file (an indexed dataset needs PREFIX.bin and PREFIX.idx)")
        idx_size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            head = f.read(_HEADER.size)
        if len(head) < _HEADER.size or head[:9] != MEGATRON_MAGIC:
            raise DataError(f"{idx_path}: not a Megatron index file (bad magic), expected MMIDIDX")
        _, version, code, S, D = _HEADER.unpack(head)
        if version != 1:
            raise DataError(f"{idx_path}: Megatron index version {version}, megams reads version 1")
        if code not in DTYPES or DTYPES[code].kind == "f":
            what = f"{DTYPES[code].name} (not token ids)" if code in DTYPES else f"unknown dtype code {code}"
            raise DataError(f"{idx_path}: Megatron index with {what}, expected integer token ids")
        expected = _HEADER.size + 12 * S + 8 * D
        if idx_size == expected + S and S:
            raise DataError(f"{idx_path}: a multimodal Megatron index (sequence modes), expected a text dataset")
        if idx_size != expected:
            raise DataError(f"{idx_path}: truncated or corrupted index ({idx_size} bytes, the header says {expected})")
        if D < 1:
            raise DataError(f"{idx_path}: corrupted index (no document indices, expected 0, ..., {S})")
        pos = _HEADER.size
        self.seq_lengths = memmap(idx_path, "<i4", pos, S)
        self.seq_pointers = memmap(idx_path, "<i8", pos + 4 * S, S)
        self.doc_indices = memmap(idx_path, "<i8", pos + 12 * S, D)
        if self.doc_indices[0] != 0 or self.doc_indices[-1] != S:
            raise DataError(f"{idx_path}: corrupted index (document indices run from {int(self.doc_indices[0])} "
                            f"to {int(self.doc_indices[-1])}, expected 0 to the {S} sequences)")
        self.dtype = DTYPES[code]
        self.n_sequences = S
        size = self.dtype.itemsize
        n_tokens = int(self.seq_pointers[-1]) // size + int(self.seq_lengths[-1]) if S else 0
        bin_size = os.path.getsize(bin_path)
        if S and int(self.seq_pointers[0]) != 0:
            raise DataError(f"{idx_path}: the first sequence starts at byte {int(self.seq_pointers[0])} of {bin_path}, "
                            "expected 0")
        if bin_size != n_tokens * size:
            raise DataError(f"{bin_path}: truncated or corrupted ({bin_size} bytes, the index says {n_tokens} tokens "
                            f"of {size} byte(s) = {n_tokens * size})")
        self._n_tokens = n_tokens
        self.tokens = memmap(bin_path, self.dtype, 0, n_tokens)
        self.meta = {"format": "megatron", "vocab_size": None, "tokenizer": None, "n_documents": D - 1,
                     "n_tokens": n_tokens, "n_sequences": S}
        self.tokenizer = None
        self._decoded: dict = {}
        self._idx, self._bin = PositionalFile(idx_path), PositionalFile(bin_path)
        self._pointers_at, self._docs_at = _HEADER.size + 4 * S, _HEADER.size + 12 * S

    # -- the index ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.doc_indices) - 1

    @property
    def n_tokens(self) -> int:
        return self._n_tokens

    @property
    def source_bytes(self) -> Optional[int]:
        return None  # not stored: see decoded_bytes

    def doc_start(self, i: int) -> int:
        """Token offset of document i: two 8-byte preads (no memory map touched)."""
        s = self._idx.int64(self._docs_at + 8 * i)
        if s >= self.n_sequences:
            return self._n_tokens
        return self._idx.int64(self._pointers_at + 8 * s) // self.dtype.itemsize

    def read_tokens(self, a: int, b: int) -> np.ndarray:
        a, b = max(0, a), min(b, self._n_tokens)
        return self._bin.array(self.dtype, a * self.dtype.itemsize, max(0, b - a))

    def doc_starts(self, a: int, b: int) -> np.ndarray:
        """Token offsets of documents a..b (b included): vectorised, for conversion."""
        s = np.asarray(self.doc_indices[a:b + 1])
        if self.n_sequences == 0:
            return np.zeros(s.shape, np.int64)
        ptr = np.asarray(self.seq_pointers[np.minimum(s, self.n_sequences - 1)]) // self.dtype.itemsize
        return np.where(s >= self.n_sequences, self._n_tokens, ptr).astype(np.int64)

    @property
    def doc_offsets(self) -> np.ndarray:
        """Token offset of every document (reads the whole index: for tests and small datasets)."""
        return self.doc_starts(0, len(self))

    def doc(self, i: int) -> np.ndarray:
        return self.read_tokens(self.doc_start(i), self.doc_start(i + 1))

    def _doc_of(self, pos: int) -> int:
        """The last document starting at or before token `pos` (binary search in the memory map)."""
        lo, hi = 0, len(self) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.doc_start(mid) <= pos:
                lo = mid
            else:
                hi = mid - 1
        return lo

    # -- the tokenizer and the bytes ---------------------------------------------------------------
    def use_tokenizer(self, tokenizer, cache_dir: Optional[str] = None) -> None:
        """Check the ids against `tokenizer`'s vocabulary (the largest id, scanned once and cached) and
        decode with it from now on."""
        info = self.scan(cache_dir)
        if not info["contiguous"]:
            raise DataError(f"{self.prefix}.idx: {info['contiguous_error']} (megams reads the token stream in order; "
                            "rewrite it with tools/preprocess_data.py --convert)")
        name = getattr(tokenizer, "model_path", tokenizer.name)
        if info["n_tokens"] and info["max_id"] >= tokenizer.vocab_size:
            raise DataError(f"{self.prefix}.bin: largest token id {info['max_id']} >= vocabulary size "
                            f"{tokenizer.vocab_size} of data.tokenizer {name} (expected the tokenizer this Megatron "
                            "dataset was made with)")
        if info["n_tokens"] and info["min_id"] < 0:
            raise DataError(f"{self.prefix}.bin: negative token id {info['min_id']} (expected ids in [0, "
                            f"{tokenizer.vocab_size}) of data.tokenizer {name})")
        self.tokenizer = tokenizer
        self.meta.update(vocab_size=tokenizer.vocab_size, tokenizer=tokenizer.name,
                         tokenizer_fingerprint=tokenizer.fingerprint, eod_id=tokenizer.eod_id,
                         max_id=info["max_id"])
        self._decoded = {}

    def scan(self, cache_dir: Optional[str] = None) -> dict:
        """Largest and smallest token id, and whether the sequences are stored back to back: one pass over
        the files in fixed-size reads (memory stays flat; nothing stays mapped), cached in `cache_dir`
        under the files' names, sizes and modification times."""
        files = [os.path.abspath(self.prefix + ext) for ext in (".idx", ".bin")]
        key = json.dumps([[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files])
        cache = None
        if cache_dir:
            cache = os.path.join(os.path.abspath(cache_dir),
                                 f"megatron-scan-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json")
            try:
                with open(cache) as f:
                    info = json.load(f)
                if info.get("key") == key:
                    return info
            except (OSError, ValueError):
                pass
        info = dict(self._scan(), key=key)
        if cache:
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            tmp = f"{cache}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(info, f)
            os.replace(tmp, cache)
        return info

    def _scan(self) -> dict:
        S, size = self.n_sequences, self.dtype.itemsize
        info = {"n_tokens": self._n_tokens, "max_id": -1, "min_id": 0, "contiguous": True, "contiguous_error": ""}
        idx = self.prefix + ".idx"
        with open(idx, "rb") as fl, open(idx, "rb") as fp:
            fl.seek(_HEADER.size)
            fp.seek(_HEADER.size + 4 * S)
            expect = 0
            for a in range(0, S, _CHUNK):
                lengths = np.fromfile(fl, "<i4", min(_CHUNK, S - a)).astype(np.int64)
                pointers = np.fromfile(fp, "<i8", lengths.size)
                want = expect + np.concatenate([[0], np.cumsum(lengths[:-1] * size)])
                bad = np.flatnonzero((pointers != want) | (lengths < 0))
                if bad.size:
                    k = int(bad[0])
                    info["contiguous"] = False
                    info["contiguous_error"] = (f"sequence {a + k} starts at byte {int(pointers[k])} of "
                                                f"{self.prefix}.bin, expected {int(want[k])} (right after the one "
                                                "before it)")
                    break
                expect = int(pointers[-1]) + int(lengths[-1]) * size
        with open(idx, "rb") as f:
            f.seek(_HEADER.size + 12 * S)
            prev = 0
            D = len(self.doc_indices)
            for a in range(0, D, _CHUNK):
                d = np.fromfile(f, "<i8", min(_CHUNK, D - a))
                if np.any(np.diff(d) < 0) or d[0] < prev:
                    info["contiguous"] = False
                    info["contiguous_error"] = "corrupted index (document indices are not increasing)"
                    break
                prev = int(d[-1])
        with open(self.prefix + ".bin", "rb") as f:
            while True:
                ids = np.fromfile(f, self.dtype, _CHUNK)
                if not ids.size:
                    break
                info["max_id"] = max(info["max_id"], int(ids.max()))
                info["min_id"] = min(info["min_id"], int(ids.min()))
        return info

    def decoded_bytes(self, i: int) -> int:
        """UTF-8 bytes of document i decoded with the tokenizer (end-of-document dropped); cached."""
        n = self._decoded.get(i)
        if n is None:
            n = decoded_length(self.tokenizer, self.doc(i), self.prefix)
            if len(self._decoded) >= 1 << 16:
                self._decoded.clear()
            self._decoded[i] = n
        return n

    @property
    def doc_bytes(self) -> np.ndarray:
        return np.asarray([self.decoded_bytes(i) for i in range(len(self))], dtype=np.int64)

    def source_bytes_before(self, positions) -> np.ndarray:
        """Like IndexedDataset.source_bytes_before, with each document's bytes from decoding it, counted
        from the start of the first document the positions touch: differences between the positions of
        one call (what bits per byte needs) are exact at document boundaries and linear inside documents,
        as for the megams layout; the common offset is not the bytes before that document."""
        if self.tokenizer is None:
            raise DataError(f"{self.prefix}: a Megatron dataset needs data.tokenizer to count source bytes")
        pos = np.asarray(positions, dtype=np.int64)
        if len(self) == 0 or pos.size == 0:
            return np.zeros(pos.shape)
        docs = np.asarray([self._doc_of(int(p)) for p in pos.ravel()]).reshape(pos.shape)
        first, last = int(docs.min()), int(docs.max())
        nbytes = np.asarray([self.decoded_bytes(d) for d in range(first, last + 1)], dtype=np.float64)
        cum = np.concatenate([[0.0], np.cumsum(nbytes)])
        starts = self.doc_starts(first, last + 1)
        k = docs - first
        start, length = starts[k], starts[k + 1] - starts[k]
        inside = np.where(length > 0, (pos - start) / np.maximum(length, 1), 0.0)
        return cum[k] + nbytes[k] * inside

    def __repr__(self) -> str:
        return (f"MegatronIndexedDataset({self.prefix!r}: {len(self)} documents, {self.n_tokens} tokens, "
                f"{self.dtype})")


def decoded_length(tokenizer, ids: np.ndarray, where: str = "") -> int:
    """UTF-8 bytes of `ids` decoded (end-of-document tokens dropped, as `decode` does)."""
    ids = np.asarray(ids)
    if getattr(tokenizer, "name", None) == "byte":  # fast path: the bytes themselves
        raw = ids[ids != tokenizer.eod_id].astype(np.uint8).tobytes()
        return len(raw.decode("utf-8", errors="replace").encode("utf-8"))
    return len(tokenizer.decode(ids.tolist()).encode("utf-8"))


def is_megatron(prefix: str) -> bool:
    from megams.data.indexed import index_format
    return exists(prefix) and index_format(prefix) == "megatron"

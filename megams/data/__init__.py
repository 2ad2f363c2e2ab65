"""Data for training: `build_data(cfg.data, seq_len, seed) -> DataBundle(tokenizer, train, valid, test, info)`.

Sources (`data.path`, each `data.blend[i].path`, `data.valid_path`; relative paths from the working dir):
- null                          -> the built-in corpus (Python's own documentation, see corpus.py)
- PREFIX with PREFIX.bin/.idx   -> an indexed dataset, used as it is (its tokenizer must be `data.tokenizer`):
                                   megams' own layout or a Megatron-LM / GPT-NeoX one (MMIDIDX), told
                                   apart by the header (megams.data.megatron)
- any other file                -> text or JSONL (.jsonl/.json), tokenized once into `data.cache_dir`
Text sources and the built-in corpus are cached under a key of (file path, size, mtime / corpus hash,
tokenizer fingerprint, document options): rank 0 tokenizes what is missing, and every rank then meets
at `barrier()` (called exactly once on every rank) before opening the datasets.
`progress` is a bool (a tqdm bar with MB/s on rank 0) or a callable `progress(bytes_done, bytes_total)`
called from rank 0 while it tokenizes (bytes of source text; bytes_total may be None: unknown).

Trainer side: `bundle.global_batches(...)` for training steps, `bundle.eval_batches(...)` for validation,
`check_vocab(bundle.tokenizer, cfg.model.vocab_size)` before building the model.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from megams.data.batches import EvalBatches, GlobalBatches, eval_batches
from megams.data.blend import BlendedDataset
from megams.data.corpus import builtin_corpus
from megams.data.errors import DataError
from megams.data.gpt_dataset import SPLIT_NAMES, GPTDataset, build_splits, require_windows
from megams.data.indexed import (VERSION, IndexedDataset, IndexedDatasetWriter, check_tokenizer, exists,
                                 index_format)
from megams.data.megatron import MegatronIndexedDataset
# (the module stays `megams.data.preprocess`: import its functions from there)
from megams.data.preprocess import preprocess as _preprocess_files, preprocess_documents as _preprocess_documents
from megams.data.sources import check_text_file, is_jsonl, read_documents
from megams.data.tokenizers import (ByteTokenizer, SentencePieceTokenizer, check_vocab, load_tokenizer,
                                    train_sentencepiece)


@dataclass
class DataBundle:
    tokenizer: object
    train: object                      # GPTDataset or BlendedDataset (shuffled)
    valid: Optional[object] = None     # in stream order; None when there is no validation data
    test: Optional[object] = None
    info: dict = field(default_factory=dict)

    def global_batches(self, global_batch: int, micro_batch: int, dp_rank: int = 0,
                       dp_size: int = 1) -> GlobalBatches:
        return GlobalBatches(self.train, self.train.seq_len, global_batch, micro_batch, dp_rank, dp_size)

    def eval_batches(self, n_batches: int, batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                     split: str = "valid") -> EvalBatches:
        dataset = getattr(self, split)
        if dataset is None:
            why = "its fraction is 0" + (" and data.valid_path is not set" if split == "valid" else "")
            raise DataError(f"data.split: there is no {split} data ({why})")
        return eval_batches(dataset, n_batches, batch_size, dp_rank, dp_size)


@dataclass
class _Source:
    """One configured source, resolved: where its indexed dataset is (or will be) and how to make it."""

    label: str                   # as the user wrote it, for messages
    prefix: str                  # indexed dataset prefix
    description: str
    build: Optional[Callable[[], object]] = None  # None: nothing to tokenize


def _cache_prefix(cache_dir: str, stem: str, key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    return os.path.join(os.path.abspath(cache_dir), f"{stem}-{digest}")


def _resolve(path: Optional[str], field_name: str, cfg, tokenizer, progress: bool) -> _Source:
    common = {"tokenizer": tokenizer.fingerprint, "append_eod": cfg.append_eod, "format": VERSION}
    build_args = dict(tokenizer_spec=cfg.tokenizer, workers=cfg.num_workers, append_eod=cfg.append_eod,
                      progress=progress)
    if path is None:
        corpus = builtin_corpus()
        prefix = _cache_prefix(cfg.cache_dir, "builtin", dict(common, builtin=corpus.sha256))
        return _Source("built-in corpus", prefix, corpus.description, lambda: _preprocess_documents(
            corpus.documents, prefix, source=corpus.description, **build_args))
    for suffix in ("", ".bin", ".idx"):  # PREFIX, PREFIX.bin or PREFIX.idx all name the indexed dataset
        if path.endswith(suffix) and exists(path[:len(path) - len(suffix)]):
            prefix = os.path.abspath(path[:len(path) - len(suffix)])
            kind = "Megatron dataset" if index_format(prefix) == "megatron" else "indexed dataset"
            return _Source(path, prefix, f"{kind} {path}")
    if not os.path.exists(path):
        for have, missing in ((".bin", ".idx"), (".idx", ".bin")):
            if os.path.isfile(path + have):
                raise DataError(f"{field_name}: {path}{missing}: no such file (found {path}{have}; an indexed "
                                "dataset needs both)")
        raise DataError(f"{field_name}: {path}: no such file (expected a text/JSONL file or an indexed dataset "
                        f"prefix with {path}.bin and {path}.idx)")
    check_text_file(path)  # every rank: cheap, and a bad file fails everywhere instead of hanging at the barrier
    st = os.stat(path)
    key = dict(common, path=os.path.abspath(path), size=st.st_size, mtime_ns=st.st_mtime_ns)
    key.update({"text_key": cfg.text_key} if is_jsonl(path) else {"doc_sep": cfg.doc_sep})
    stem = os.path.splitext(os.path.basename(path))[0] or "data"
    prefix = _cache_prefix(cfg.cache_dir, stem, key)
    return _Source(path, prefix, f"{path} ({st.st_size:,} bytes)", lambda: _preprocess_files(
        [path], prefix, doc_sep=cfg.doc_sep, text_key=cfg.text_key, **build_args))


def _blend(parts: List[Optional[object]], weights: List[float], name: str):
    if parts[0] is None:
        return None
    return parts[0] if len(parts) == 1 else BlendedDataset(parts, weights, name)


def build_data(data_cfg, seq_len: int, seed: int, is_rank_zero: bool = True,
               barrier: Callable[[], None] = lambda: None, progress=True) -> DataBundle:
    """Resolve, tokenize (rank 0, once, cached) and open the configured data; cut it into windows of
    seq_len + 1. `barrier()` is called exactly once on every rank, between tokenizing and opening."""
    cfg = data_cfg
    try:
        tokenizer = load_tokenizer(cfg.tokenizer)
    except DataError as e:
        raise DataError(f"data.tokenizer: {e}") from None
    if cfg.blend:
        configured = [(b.path, f"data.blend[{i}].path", b.weight) for i, b in enumerate(cfg.blend)]
    else:
        configured = [(cfg.path, "data.path", 1.0)]
    show = progress if is_rank_zero else False
    sources = [_resolve(path, name, cfg, tokenizer, show) for path, name, _ in configured]
    weights = [w for _, _, w in configured]
    valid_source = _resolve(cfg.valid_path, "data.valid_path", cfg, tokenizer, show) if cfg.valid_path else None

    missing = [s for s in sources + [valid_source] if s and s.build is not None and not exists(s.prefix)]
    if is_rank_zero:
        for s in missing:
            s.build()
    barrier()

    split = list(cfg.split)
    if valid_source:  # validation comes from its own source: its share of the main stream goes to train
        split = [split[0] + split[1], 0.0, split[2]]
    indexed = [_open(s, tokenizer, cfg.cache_dir) for s in sources]
    parts = [build_splits(ds, seq_len, split, seed, s.label) for ds, s in zip(indexed, sources)]
    train, valid, test = (_blend([p[k] for p in parts], weights, name) for k, name in enumerate(SPLIT_NAMES))
    if valid_source:
        valid = GPTDataset(_open(valid_source, tokenizer, cfg.cache_dir), seq_len, seed=seed, shuffle=False, name="valid",
                           source=valid_source.label)
        require_windows(valid, "data.valid_path")

    info = {"tokenizer": tokenizer.name, "tokenizer_fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size, "seq_len": seq_len,
            "windows": {name: len(d) if d is not None else 0 for name, d in zip(SPLIT_NAMES, (train, valid, test))},
            "sources": [{"path": s.label, "description": s.description, "prefix": s.prefix, "weight": w,
                         "documents": len(ds), "tokens": ds.n_tokens, "source_bytes": ds.source_bytes, "format": ds.format,
                         "tokenized_now": s in missing} for s, ds, w in zip(sources, indexed, weights)],
            "valid_path": valid_source.label if valid_source else None}
    info["summary"] = _summary(info, sources + ([valid_source] if valid_source else []))
    return DataBundle(tokenizer, train, valid, test, info)


def _open(source: _Source, tokenizer, cache_dir: str) -> IndexedDataset:
    ds = IndexedDataset(source.prefix)  # a MegatronIndexedDataset for an MMIDIDX index
    check_tokenizer(ds, tokenizer, cache_dir)
    return ds


def _summary(info: dict, sources: List[_Source]) -> str:
    w = info["windows"]
    tokens = sum(x["tokens"] for x in info["sources"])
    described = "; ".join(s.description for s in sources[:len(info["sources"])])
    if info["valid_path"]:
        described += f" (validation: {sources[-1].description})"
    return (f"{described} -> {tokens:,} tokens ({info['tokenizer']}, vocab "
            f"{info['vocab_size']}); windows of {info['seq_len']}+1: train {w['train']:,}, valid {w['valid']:,}, "
            f"test {w['test']:,}")


__all__ = ["build_data", "DataBundle", "DataError", "check_vocab", "load_tokenizer", "ByteTokenizer",
           "SentencePieceTokenizer", "train_sentencepiece", "builtin_corpus", "read_documents", "IndexedDataset",
           "MegatronIndexedDataset", "IndexedDatasetWriter", "GPTDataset", "BlendedDataset", "GlobalBatches", "EvalBatches", "eval_batches"]

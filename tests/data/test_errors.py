"""Every bad input fails with one line that names the file (or the config field) and what was expected.
The library-level messages; the same inputs through the entry points are the catalogue (docs/ERRORS.md)."""
import os

import numpy as np
import pytest

from megams.config import DataConfig
from megams.data import (DataError, GPTDataset, IndexedDataset, IndexedDatasetWriter, build_data,
                         eval_batches, load_tokenizer, read_documents)
from megams.data.preprocess import preprocess


def message(fn, *args, **kwargs):
    with pytest.raises(DataError) as e:
        result = fn(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    text = str(e.value)
    assert "\n" not in text
    return text


def _cfg(tmp_path, **kw):
    return DataConfig(cache_dir=str(tmp_path / "cache"), num_workers=1, **kw)


def test_missing_empty_and_directory(tmp_path, write):
    missing = str(tmp_path / "missing.txt")
    assert message(read_documents, missing) == f"{missing}: no such file"
    empty = write("empty.txt", "")
    assert message(read_documents, empty) == f"{empty}: empty file, expected UTF-8 text"
    assert message(read_documents, str(tmp_path)) == f"{tmp_path}: is a directory, expected a text or JSONL file"
    blank = write("blank.txt", "\n  \n\t\n")
    assert message(read_documents, blank) == (
        f"{blank}: no documents (only whitespace or empty texts), expected UTF-8 text")
    assert message(build_data, _cfg(tmp_path, path=missing), 8, 0) == (
        f"data.path: {missing}: no such file (expected a text/JSONL file or an indexed dataset prefix with "
        f"{missing}.bin and {missing}.idx)")
    assert message(build_data, _cfg(tmp_path, valid_path=missing), 8, 0).startswith(f"data.valid_path: {missing}: ")


def test_binary_files(write):
    nul = write("nul.txt", b"text\nmore\x00text\n")
    assert message(read_documents, nul) == f"{nul}: binary file (NUL byte on line 2), expected UTF-8 text"
    late = write("late.txt", b"line\n" * 5000 + b"bad\x00\n")     # past the 8 KiB checked on open
    assert message(read_documents, late) == f"{late}: binary file (NUL byte on line 5001), expected UTF-8 text"
    latin1 = write("latin1.txt", "caf\u00e9\n".encode("latin-1"))
    assert message(read_documents, latin1) == (
        f"{latin1}: binary file (not UTF-8: byte 0xe9 on line 1), expected UTF-8 text")


def test_jsonl_lines(write):
    no_key = write("a.jsonl", '{"text": "fine"}\n\n{"body": "no text key"}\n')
    assert message(read_documents, no_key) == (
        f"{no_key}: line 3: no 'text' key, expected a JSON object with the text under 'text'")
    bad = write("b.jsonl", '{"text": "fine"}\n{"text": \n')
    assert message(read_documents, bad) == (
        f"{bad}: line 2: not valid JSON (Expecting value), expected one JSON object per line")
    number = write("c.jsonl", '{"text": 3}\n')
    assert message(read_documents, number) == f"{number}: line 1: 'text' is int, expected a string"
    nul = write("d.jsonl", '{"text": "a\\u0000b"}\n')
    assert message(read_documents, nul) == (
        f"{nul}: line 1: 'text' contains a NUL character (binary data?), expected text")


def test_preprocess_reports_errors_from_workers(tmp_path, write):
    good = write("good.txt", "fine text\n")
    bad = write("bad.jsonl", '{"text": "ok"}\n' * 3 + '{"txt": "x"}\n')
    assert message(preprocess, [good, bad], str(tmp_path / "out"), workers=2, progress=False) == (
        f"{bad}: line 4: no 'text' key, expected a JSON object with the text under 'text'")
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "good.txt"]  # nothing half-written


def test_tokenizer_files(tmp_path, write):
    missing = str(tmp_path / "tok.model")
    assert message(load_tokenizer, missing) == (
        f"{missing}: tokenizer model not found (expected 'byte' or a sentencepiece .model file)")
    junk = write("junk.model", "not a model")
    assert message(load_tokenizer, junk) == (
        f"{junk}: not a sentencepiece model (its protobuf does not parse), expected a .model file written by "
        "tools/train_tokenizer.py or sentencepiece")
    empty = write("e.model", b"")
    assert message(load_tokenizer, empty) == f"{empty}: empty file (expected a sentencepiece .model file)"


def test_dataset_too_small(tmp_path, write):
    path = write("tiny.txt", "x" * 99)  # 100 tokens with the eod
    assert message(build_data, _cfg(tmp_path, path=path), 128, 0) == (
        f"{path}: dataset too small: 100 tokens, the train split (90%) has 90, fewer than one window of "
        "data.seq_len+1 = 129 tokens (use more text, a smaller data.seq_len or another data.split)")
    assert message(build_data, _cfg(tmp_path, path=path), 50, 0) == (
        f"{path}: dataset too small: 100 tokens, the valid split (10%) has 10, fewer than one window of "
        "data.seq_len+1 = 51 tokens (use more text, a smaller data.seq_len or another data.split)")
    valid = build_data(_cfg(tmp_path, path=path, split=[0.1, 0.9, 0]), 8, 0, progress=False).valid
    assert message(eval_batches, valid, 1, 64) == (
        f"{path}: the valid split has 10 windows of 8+1 tokens, fewer than one eval batch of 64")
    bundle = build_data(_cfg(tmp_path, path=path), 8, 0, progress=False)
    assert message(bundle.eval_batches, 1, 1, split="test") == "data.split: there is no test data (its fraction is 0)"


@pytest.fixture
def indexed(tmp_path):
    prefix = str(tmp_path / "ds")
    with IndexedDatasetWriter(prefix, 1000) as w:
        w.add_document(np.arange(10), 10)
        w.add_document(np.arange(5), 5)
    return prefix


def test_index_problems(indexed):
    """Truncated / foreign / mismatched files through build_data are catalogue entries (docs/ERRORS.md,
    data.*); here what only IndexedDataset itself says."""
    idx, bin_ = indexed + ".idx", indexed + ".bin"
    with open(idx, "r+b") as f:  # header "<8sIIQQ": dtype code at byte 12; uint8 cannot hold vocab 1000
        f.seek(12)
        f.write((1).to_bytes(4, "little"))
    assert message(IndexedDataset, indexed) == (
        f"{idx}: dtype mismatch: uint8 tokens cannot hold the vocab_size=1000 its metadata records (expected uint16)")
    os.remove(bin_)
    assert message(IndexedDataset, indexed) == (
        f"{bin_}: no such file (an indexed dataset needs PREFIX.bin and PREFIX.idx)")


def test_layout_problems(tmp_path, indexed):
    from megams.data import GlobalBatches
    ds = GPTDataset(IndexedDataset(indexed), 4)
    assert message(GlobalBatches, ds, 4, 12, 4, 0, 2) == (
        "training.global_batch_size=12 is not divisible by training.micro_batch_size=4 x data-parallel size 2 = 8")
    assert message(GlobalBatches, ds, 8, 12, 4, 0, 1) == (
        "data.seq_len=8, but the dataset was cut into windows of 4+1")
    assert message(GPTDataset, IndexedDataset(indexed), 4, seed=-1) == (
        "training.seed=-1: the data order needs a non-negative seed")

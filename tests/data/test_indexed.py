import numpy as np
import pytest

from megams.data import IndexedDataset, IndexedDatasetWriter


@pytest.mark.parametrize("vocab, dtype", [(256, np.uint8), (1000, np.uint16), (65536, np.uint16), (70000, np.int32)])
def test_round_trip_each_dtype(tmp_path, vocab, dtype):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, vocab, size=n) for n in (5, 1, 300, 17)]
    prefix = str(tmp_path / "ds")
    with IndexedDatasetWriter(prefix, vocab, {"tokenizer": "t", "tokenizer_fingerprint": "fp"}) as w:
        for i, d in enumerate(docs):
            w.add_document(d, source_bytes=10 * i)
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.dtype(dtype) and ds.tokens.dtype == np.dtype(dtype)
    assert len(ds) == 4 and ds.n_tokens == 323
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds.doc(i), d)
    np.testing.assert_array_equal(ds.tokens, np.concatenate(docs))
    assert list(ds.doc_bytes) == [0, 10, 20, 30]
    assert ds.meta["vocab_size"] == vocab and ds.meta["tokenizer_fingerprint"] == "fp" and ds.meta["n_tokens"] == 323
    assert (tmp_path / "ds.bin").stat().st_size == 323 * np.dtype(dtype).itemsize
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]


def test_bulk_add_equals_one_by_one(tmp_path):
    docs = [np.arange(3), np.arange(5), np.arange(2)]
    with IndexedDatasetWriter(str(tmp_path / "a"), 256) as w:
        for d in docs:
            w.add_document(d, 7)
    with IndexedDatasetWriter(str(tmp_path / "b"), 256) as w:
        w.add_documents(np.concatenate(docs), [3, 5, 2], [7, 7, 7])
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    assert (tmp_path / "a.idx").read_bytes() == (tmp_path / "b.idx").read_bytes()


def test_source_bytes_exact_at_document_boundaries(tmp_path):
    with IndexedDatasetWriter(str(tmp_path / "ds"), 256) as w:
        w.add_document([1, 2, 3, 4], 8)   # tokens 0..3
        w.add_document([5, 6], 3)         # tokens 4..5
    ds = IndexedDataset(str(tmp_path / "ds"))
    np.testing.assert_allclose(ds.source_bytes_before([0, 2, 4, 5, 6]), [0, 4, 8, 9.5, 11])


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="token id out of range"):
        with IndexedDatasetWriter(str(tmp_path / "ds"), 256) as w:
            w.add_document([1, 2], 2)
            w.add_document([300], 1)
    assert list(tmp_path.iterdir()) == []


def test_empty_dataset_opens(tmp_path):
    IndexedDatasetWriter(str(tmp_path / "ds"), 256).finalize()
    ds = IndexedDataset(str(tmp_path / "ds"))
    assert len(ds) == 0 and ds.n_tokens == 0 and ds.tokens.size == 0

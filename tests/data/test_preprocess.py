import numpy as np

import megams.data.preprocess as preprocess_module
from megams.data import builtin_corpus, load_tokenizer
from megams.data.preprocess import preprocess


def _files(prefix):
    return open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()


def test_two_workers_equal_one(tmp_path, monkeypatch, write, sample_text, sp_model):
    monkeypatch.setattr(preprocess_module, "_CHUNK_BYTES", 3000)  # many chunks: order matters
    a = write("a.txt", sample_text)
    b = write("b.jsonl", "".join('{"text": "doc %d é"}\n' % i for i in range(50)))
    for tok in ("byte", sp_model):
        one = preprocess([a, b], str(tmp_path / "one"), tok, workers=1, progress=False)
        two = preprocess([a, b], str(tmp_path / "two"), tok, workers=2, progress=False)
        assert len(one) > 20
        assert _files(str(tmp_path / "one")) == _files(str(tmp_path / "two"))
        assert two.meta["source"] == f"{a}, {b}"


def test_documents_in_order_with_eod(tmp_path, write, sp_model):
    path = write("a.txt", "first doc\nline two\n\nsecond ünïcode doc\n\nthird")
    texts = ["first doc\nline two", "second ünïcode doc", "third"]
    for spec in ("byte", sp_model):
        tok = load_tokenizer(spec)
        ds = preprocess([path], str(tmp_path / "ds"), spec, progress=False)
        assert len(ds) == 3 and ds.meta["eod_id"] == tok.eod_id and ds.meta["append_eod"] is True
        for i, text in enumerate(texts):
            doc = ds.doc(i).tolist()
            assert doc[-1] == tok.eod_id and tok.decode(doc) == text
        assert list(ds.doc_bytes) == [len(t.encode()) for t in texts]
    ds = preprocess([path], str(tmp_path / "noeod"), "byte", append_eod=False, progress=False)
    assert bytes(ds.tokens) == "".join(texts).encode()


def test_builtin_corpus(tmp_path):
    ds = preprocess(None, str(tmp_path / "builtin"), "byte", workers=2, progress=False)
    docs = builtin_corpus().documents
    assert len(ds) == len(docs) and ds.n_tokens == sum(len(d.encode()) + 1 for d in docs)
    assert ds.dtype == np.uint8 and "built-in corpus" in ds.meta["source"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["builtin.bin", "builtin.idx"]

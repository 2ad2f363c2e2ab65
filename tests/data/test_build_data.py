import os

import numpy as np
import pytest

from megams.config import DataConfig
from megams.data import BlendedDataset, GPTDataset, build_data, load_tokenizer
from megams.data.preprocess import preprocess


def _cfg(tmp_path, **kw):
    return DataConfig(cache_dir=str(tmp_path / "cache"), num_workers=1, **kw)


def test_builtin_corpus_by_default_and_cached(tmp_path):
    cfg = _cfg(tmp_path)
    first = build_data(cfg, 128, seed=1, progress=False)
    assert first.tokenizer.name == "byte" and isinstance(first.train, GPTDataset)
    assert first.info["sources"][0]["tokenized_now"] and first.test is None
    w = first.info["windows"]
    assert w["train"] > 1000 and w["valid"] > 100 and w["test"] == 0
    again = build_data(cfg, 128, seed=1, progress=False)
    assert not again.info["sources"][0]["tokenized_now"]
    np.testing.assert_array_equal(again.train.sample(7), first.train.sample(7))
    assert len(os.listdir(tmp_path / "cache")) == 2


def test_text_file_cache_follows_the_file(tmp_path, write, sample_text):
    path = write("shakespeare.txt", sample_text)
    cfg = _cfg(tmp_path, path=path, split=[0.8, 0.1, 0.1])
    bundle = build_data(cfg, 64, seed=0, progress=False)
    assert bundle.info["sources"][0]["tokenized_now"] and bundle.test is not None
    assert build_data(cfg, 64, seed=0, progress=False).info["sources"][0]["tokenized_now"] is False
    write("shakespeare.txt", sample_text[:-1000])          # edited: tokenized again
    edited = build_data(cfg, 64, seed=0, progress=False)
    assert edited.info["sources"][0]["tokenized_now"]
    assert edited.info["sources"][0]["tokens"] < bundle.info["sources"][0]["tokens"]


def test_relative_paths_resolve_from_the_working_directory(tmp_path, monkeypatch, write):
    write("rel/data.jsonl", "".join('{"text": "document number %d"}\n' % i for i in range(100)))
    monkeypatch.chdir(tmp_path)
    bundle = build_data(DataConfig(path="rel/data.jsonl", cache_dir="c", num_workers=1), 32, 0, progress=False)
    assert bundle.info["sources"][0]["prefix"].startswith(str(tmp_path / "c"))
    assert bundle.info["sources"][0]["documents"] == 100


def test_indexed_prefix_used_directly(tmp_path, write, sample_text, sp_model):
    src = write("a.txt", sample_text)
    preprocess([src], str(tmp_path / "idx" / "a"), sp_model, progress=False)
    for path in (str(tmp_path / "idx" / "a"), str(tmp_path / "idx" / "a.bin")):
        bundle = build_data(_cfg(tmp_path, path=path, tokenizer=sp_model), 64, 0, progress=False)
        assert bundle.info["sources"][0]["prefix"] == str(tmp_path / "idx" / "a")
        assert bundle.tokenizer.vocab_size == 512
    assert not (tmp_path / "cache").exists()


def test_blend_and_separate_validation(tmp_path, write, sample_text):
    a = write("a.txt", sample_text)
    b = write("b.txt", "\n\n".join(f"another document {i}" for i in range(2000)))
    v = write("v.txt", sample_text[-8000:])
    cfg = _cfg(tmp_path, blend=[{"path": a, "weight": 3}, {"path": b, "weight": 1}], valid_path=v)
    bundle = build_data(cfg, 64, seed=2, progress=False)
    assert isinstance(bundle.train, BlendedDataset) and bundle.train.weights == [0.75, 0.25]
    train_a = bundle.train.datasets[0]
    assert (train_a.start, train_a.end) == (0, train_a.indexed.n_tokens)  # valid share goes to train
    assert isinstance(bundle.valid, GPTDataset) and not bundle.valid.shuffle and bundle.info["valid_path"] == v
    ev = bundle.eval_batches(2, 4)
    assert len(ev) == 2 and 0.9 < ev.bytes_per_token <= 1.0
    no_valid = build_data(_cfg(tmp_path, blend=[{"path": a}, {"path": b}]), 64, 2, progress=False)
    assert isinstance(no_valid.valid, BlendedDataset) and len(no_valid.valid) > 0


def test_rank_zero_builds_and_everyone_meets_at_the_barrier_once(tmp_path):
    cfg = _cfg(tmp_path)
    calls = []

    def barrier():  # stands for rank 0 tokenizing meanwhile
        calls.append("barrier")
        build_data(cfg, 128, 1, is_rank_zero=True, progress=False)

    other_rank = build_data(cfg, 128, 1, is_rank_zero=False, barrier=barrier, progress=False)
    assert calls == ["barrier"] and len(other_rank.train) > 0
    calls.clear()
    build_data(cfg, 128, 1, barrier=lambda: calls.append("barrier"), progress=False)  # cached: barrier anyway
    assert calls == ["barrier"]


def test_sentencepiece_bytes_per_token(tmp_path, write, sample_text, sp_model):
    path = write("a.txt", sample_text)
    bundle = build_data(_cfg(tmp_path, path=path, tokenizer=sp_model), 64, 0, progress=False)
    ev = bundle.eval_batches(2, 4)
    tok = load_tokenizer(sp_model)
    n_bytes = sum(len(tok.decode(t.tolist()).encode()) for _, targets in ev for t in targets)
    assert ev.bytes_per_token == pytest.approx(n_bytes / ev.n_tokens, rel=0.1)

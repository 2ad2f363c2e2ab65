import pickle

from megams.data import ByteTokenizer, SentencePieceTokenizer, check_vocab, load_tokenizer, train_sentencepiece

MIXED = "naïve café — 日本語 🙂\n\ttabs  and  spaces\n\nnew paragraph, digits 12345"


def test_byte_round_trip_including_non_ascii():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.eod_id, tok.fingerprint, tok.name) == (256, 0, "byte", "byte")
    ids = tok.encode(MIXED)
    assert ids == list(MIXED.encode("utf-8")) and all(0 < i < 256 for i in ids)
    assert tok.decode(ids) == MIXED
    assert tok.decode(ids + [tok.eod_id] + ids) == MIXED + MIXED  # end-of-document is not text
    assert tok.decode(list("日".encode("utf-8"))[:2]) == "\ufffd"  # a cut character (model output) never raises


def test_sentencepiece_round_trip(sp_model, sample_text):
    tok = load_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.vocab_size == 512 and tok.eod_id == 1 and tok.name == "sample.model"
    for text in (sample_text[:5000], MIXED, " leading space", "trailing newline\n", "x"):
        ids = tok.encode(text)
        assert all(0 <= i < 512 and i != tok.eod_id for i in ids)
        assert tok.decode(ids) == text
    assert len(tok.encode(sample_text[:5000])) < 5000 / 2  # it learned something
    assert tok.decode(tok.encode("ab") + [tok.eod_id]) == "ab"
    assert pickle.loads(pickle.dumps(tok)).encode(MIXED) == tok.encode(MIXED)


def test_sentencepiece_fingerprint_is_stable_and_training_deterministic(sp_model, tmp_path, sample_text):
    tok = load_tokenizer(sp_model)
    assert tok.fingerprint.startswith("sentencepiece:") and tok.fingerprint == load_tokenizer(sp_model).fingerprint
    src = tmp_path / "sample.txt"
    src.write_text(sample_text, encoding="utf-8")
    again = train_sentencepiece([str(src)], str(tmp_path / "again"), 512)
    assert load_tokenizer(again).fingerprint == tok.fingerprint
    other = train_sentencepiece([str(src)], str(tmp_path / "other"), 600)
    assert load_tokenizer(other).fingerprint != tok.fingerprint


def test_unigram(tmp_path, write, sample_text):
    src = write("small.txt", sample_text[:20_000])
    path = train_sentencepiece([src], str(tmp_path / "uni"), 400, model_type="unigram")
    tok = load_tokenizer(path)
    assert tok.vocab_size == 400 and tok.eod_id == 1
    assert tok.decode(tok.encode(MIXED)) == MIXED
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.txt", "uni.model", "uni.vocab"]  # no temp files


def test_trains_on_builtin_corpus_by_default(tmp_path):
    tok = load_tokenizer(train_sentencepiece(None, str(tmp_path / "b"), 640, input_sentence_size=200))
    assert tok.vocab_size == 640 and tok.decode(tok.encode(MIXED)) == MIXED


def test_check_vocab(sp_model):
    check_vocab(ByteTokenizer(), 256)
    check_vocab(load_tokenizer(sp_model), 512)  # too small: see test_errors

import types

from megams.data import builtin_corpus, read_documents


def test_builtin_corpus_is_non_empty_and_deterministic():
    a, b = builtin_corpus(), builtin_corpus()
    assert len(a.documents) > 50 and sum(len(d) for d in a.documents) > 300_000
    assert a.documents == b.documents and a.sha256 == b.sha256
    assert all(d and "\0" not in d for d in a.documents)
    assert "built-in corpus" in a.description and f"{len(a.documents)} documents" in a.description


def test_text_blank_line_separated(write):
    path = write("a.txt", "\ufefffirst line\nsecond line\n\n\n  \nthird\r\nfourth\r\n\r\nlast")
    docs = read_documents(path)
    assert isinstance(docs, types.GeneratorType)  # streaming
    assert list(docs) == ["first line\nsecond line", "third\r\nfourth", "last"]


def test_text_one_document_per_line(write):
    path = write("a.txt", "one\n\ntwo words\n   \nthree\n")
    assert list(read_documents(path, doc_sep="line")) == ["one", "two words", "three"]


def test_jsonl(write):
    path = write("a.jsonl", '{"text": "héllo\\nworld", "id": 1}\n\n{"text": ""}\n{"content": "x", "text": "bye"}\n')
    assert list(read_documents(path)) == ["héllo\nworld", "bye"]  # empty texts are skipped
    other = write("b.jsonl", '{"content": "c1"}\n{"content": "c2"}\n')
    assert list(read_documents(other, text_key="content")) == ["c1", "c2"]

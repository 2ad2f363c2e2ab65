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


def _reference_documents(path, doc_sep):
    """The line-by-line rules (the reader before it read in blocks), for comparison."""
    with open(path, "rb") as f:
        lines = [raw.decode("utf-8") for raw in f]
    if lines and lines[0].startswith("\ufeff"):
        lines[0] = lines[0][1:]
    if doc_sep == "line":
        return [line.rstrip("\r\n") for line in lines if line.strip()]
    docs, block = [], []
    for line in lines:
        if line.strip():
            block.append(line)
        elif block:
            docs.append("".join(block).rstrip("\r\n"))
            block = []
    if block:
        docs.append("".join(block).rstrip("\r\n"))
    return [d for d in docs if d]


def test_block_reader_matches_the_line_rules(tmp_path, monkeypatch):
    """Random texts of lines, blank lines, whitespace (Unicode too), CRLF and BOM, read in tiny blocks so
    documents and separators straddle block ends: the same documents as the line-by-line rules."""
    import random

    import megams.data.sources as sources
    monkeypatch.setattr(sources, "_BLOCK", 7)
    rng = random.Random(0)
    pieces = ["word", "two words", "  indented", "caf\u00e9 \u2603", "", " ", "\t", "\r", "\u3000", "\x0c",
              "tail  ", "x\r"]
    for case in range(300):
        lines = [rng.choice(pieces) for _ in range(rng.randint(0, 12))]
        text = ("\ufeff" if case % 7 == 0 else "") + "\n".join(lines) + rng.choice(["", "\n", "\n\n", "\r\n"])
        path = tmp_path / f"c{case}.txt"
        path.write_bytes(text.encode("utf-8"))
        for doc_sep in ("blank_line", "line"):
            want = _reference_documents(str(path), doc_sep)
            got = list(sources._text_documents(str(path), doc_sep))
            assert got == want, (text, doc_sep)


def test_block_reader_names_the_bad_line(tmp_path, monkeypatch):
    import pytest

    import megams.data.sources as sources
    from megams.data import DataError
    monkeypatch.setattr(sources, "_BLOCK", 5)
    for bad, why in ((b"\x00", "NUL byte"), (b"\xe9", "not UTF-8: byte 0xe9")):
        for k in (1, 2, 9):
            path = tmp_path / "bad.txt"
            path.write_bytes(b"ok line\n\n" * ((k - 1) // 2) + (b"" if k % 2 else b"ok line\n") + b"x" + bad + b"y\n"
                             + b"more\xff\x00\n")
            with pytest.raises(DataError) as e:
                list(sources._text_documents(str(path), "blank_line"))
            assert str(e.value) == f"{path}: binary file ({why} on line {k}), expected UTF-8 text"

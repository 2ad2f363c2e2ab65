"""Reading text sources into documents, streaming (a generator), so corpora larger than memory work.

- Plain text (any name but .jsonl/.json): documents are separated by blank lines (`doc_sep="blank_line"`,
  e.g. tiny Shakespeare, WikiText), or each non-blank line is one document (`doc_sep="line"`).
- JSONL (`.jsonl` / `.json`): one JSON object per line, the document is its `text_key` field.

Input must be UTF-8 text. A NUL byte means binary data, and it is refused: the byte tokenizer uses
NUL as its end-of-document token. Problems raise `DataError` naming the file (and the line).
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterator, Tuple

from megams.data.errors import DataError

DOC_SEPS = ("blank_line", "line")
_HEAD = 8192  # bytes checked for NUL when the file is opened (like git's binary test)


def is_jsonl(path: str) -> bool:
    return path.lower().endswith((".jsonl", ".json"))


def check_text_file(path: str) -> None:
    """Cheap checks, done at once (not when the generator is first consumed): exists, non-empty, not binary."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a text or JSONL file")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: empty file, expected UTF-8 text")
    with open(path, "rb") as f:
        head = f.read(_HEAD)
    if b"\0" in head:
        line = head[:head.index(b"\0")].count(b"\n") + 1
        raise DataError(_binary(path, line, "NUL byte"))


def read_documents(path: str, doc_sep: str = "blank_line", text_key: str = "text") -> Iterator[str]:
    """Documents of a text or JSONL file, in file order. Raises DataError for a missing, empty or binary
    file at once; problems deeper in the file raise when the generator reaches them."""
    if doc_sep not in DOC_SEPS:
        raise DataError(f"doc_sep: expected one of {', '.join(DOC_SEPS)}, got {doc_sep!r}")
    check_text_file(path)
    documents = _jsonl_documents(path, text_key) if is_jsonl(path) else _text_documents(path, doc_sep)
    return _non_empty(path, documents)


def _binary(path: str, line: int, what: str) -> str:
    return f"{path}: binary file ({what} on line {line}), expected UTF-8 text"


def _lines(path: str) -> Iterator[Tuple[int, str]]:
    """(line number, line with its newline), decoded strictly as UTF-8."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if b"\0" in raw:
                raise DataError(_binary(path, number, "NUL byte"))
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(_binary(path, number, f"not UTF-8: byte 0x{raw[e.start]:02x}")) from None
            if number == 1 and line.startswith("\ufeff"):  # byte-order mark
                line = line[1:]
            yield number, line


_BLOCK = 1 << 22  # bytes of text read at once (cut at a line end)
_BLANK_LINES = re.compile(r"\n(?:[^\S\n]*\n)+")  # one or more whitespace-only lines (str.strip() == "")


def _text_blocks(path: str) -> Iterator[str]:
    """The file decoded strictly as UTF-8 in blocks of ~4 MiB that end at a line end (the last one may
    not), checked for NUL bytes; errors name the line, as `_lines` does."""
    line0 = 1  # number of the first line of the block
    with open(path, "rb") as f:
        carry = b""
        first = True
        while True:
            raw = f.read(_BLOCK)
            data = carry + raw
            if raw:
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # no line end yet: read on
                    carry = data
                    continue
                data, carry = data[:cut], data[cut:]
            elif not data:
                return
            else:
                carry = b""
            bad_line, why = None, None
            nul = data.find(b"\0")
            if nul >= 0:
                bad_line, why = line0 + data.count(b"\n", 0, nul), "NUL byte"
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                line = line0 + data.count(b"\n", 0, e.start)
                if bad_line is None or line < bad_line:
                    bad_line, why = line, f"not UTF-8: byte 0x{data[e.start]:02x}"
            if bad_line is not None:
                raise DataError(_binary(path, bad_line, why))
            if first and text.startswith("\ufeff"):  # byte-order mark
                text = text[1:]
            first = False
            line0 += data.count(b"\n")
            yield text
            if not raw:
                return


def _text_documents(path: str, doc_sep: str) -> Iterator[str]:
    """Plain-text documents, read in large blocks (the line-by-line rules of `_lines` without a Python
    step per line for blank-line separated text)."""
    if doc_sep == "line":
        for block in _text_blocks(path):
            for line in block.split("\n"):
                if line.strip():
                    yield line.rstrip("\r\n")
        return
    pending = ""  # text from a line start: the last document so far, which may go on in the next block
    for block in _text_blocks(path):
        parts = _split_blocks(pending + block)
        pending = parts.pop()
        yield from _clean(parts)
    yield from _clean(_split_blocks(pending + "\n"))


def _split_blocks(text: str):
    # a newline before the text (which starts at a line start): a whitespace-only first line separates too
    parts = _BLANK_LINES.split("\n" + text)
    parts[0] = parts[0][1:]
    return parts


def _clean(parts) -> Iterator[str]:
    for doc in parts:
        doc = doc.rstrip("\r\n")
        if doc.strip():
            yield doc


def _jsonl_documents(path: str, text_key: str) -> Iterator[str]:
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {number}: not valid JSON ({e.msg}), expected one JSON object "
                            "per line") from None
        if not isinstance(record, dict) or text_key not in record:
            raise DataError(f"{path}: line {number}: no {text_key!r} key, expected a JSON object with the text "
                            f"under {text_key!r}")
        text = record[text_key]
        if not isinstance(text, str):
            raise DataError(f"{path}: line {number}: {text_key!r} is {type(text).__name__}, expected a string")
        if "\0" in text:
            raise DataError(f"{path}: line {number}: {text_key!r} contains a NUL character (binary data?), "
                            "expected text")
        yield text


def _non_empty(path: str, documents: Iterator[str]) -> Iterator[str]:
    """Skip empty documents; a file that yields none at all is an error (whitespace only, all-empty JSONL)."""
    count = 0
    for doc in documents:
        if doc:
            count += 1
            yield doc
    if count == 0:
        raise DataError(f"{path}: no documents (only whitespace or empty texts), expected UTF-8 text")

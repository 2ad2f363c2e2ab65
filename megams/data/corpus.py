"""The built-in corpus: text that exists on every machine with Python, so a run needs no download.

It is the documentation shipped with Python itself (`pydoc_data.topics.topics`: the language reference
sections that `help("assert")` shows): about 465 KB of English prose and code in ~80 topics. One document
per topic, in sorted key order, so the token stream is deterministic for a given Python version (the
text differs slightly between Python versions; the cache key is a hash of the text, so that is safe).
"""
from __future__ import annotations

import hashlib
import sys
from typing import List, NamedTuple


class Corpus(NamedTuple):
    documents: List[str]
    description: str
    sha256: str  # of the documents joined by NUL: identifies the exact text (cache key)


def builtin_corpus() -> Corpus:
    from pydoc_data.topics import topics

    documents = [topics[key] for key in sorted(topics) if topics[key].strip()]
    digest = hashlib.sha256("\0".join(documents).encode("utf-8")).hexdigest()
    n_bytes = sum(len(d.encode("utf-8")) for d in documents)
    description = (f"built-in corpus: Python {sys.version_info.major}.{sys.version_info.minor} documentation "
                   f"topics (pydoc_data.topics), {len(documents)} documents, {n_bytes:,} bytes")
    return Corpus(documents, description, digest)

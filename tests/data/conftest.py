import os

import pytest

from megams.data import train_sentencepiece

SHAKESPEARE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "..",
                           "shared", "data", "tinyshakespeare", "input.txt")


@pytest.fixture(scope="session")
def sample_text():
    """About 60 KB of real text: tiny Shakespeare when it is here, else the built-in corpus."""
    if os.path.isfile(SHAKESPEARE):
        with open(SHAKESPEARE, encoding="utf-8") as f:
            return f.read(60_000)
    from megams.data import builtin_corpus
    return "\n\n".join(builtin_corpus().documents)[:60_000]


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory, sample_text):
    """A 512-piece BPE model trained on the sample (about 0.3 s)."""
    d = tmp_path_factory.mktemp("tok")
    src = d / "sample.txt"
    src.write_text(sample_text, encoding="utf-8")
    return train_sentencepiece([str(src)], str(d / "sample"), 512)


@pytest.fixture
def write(tmp_path):
    """write(name, text or bytes) -> path (str) of a new file under tmp_path."""
    def _write(name, content):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return str(path)
    return _write

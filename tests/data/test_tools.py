"""tools/train_tokenizer.py and tools/preprocess_data.py: thin CLIs, `main(argv)` returns the exit code."""
import importlib.util
import os

import pytest

from megams.data import IndexedDataset, load_tokenizer

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools")


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(TOOLS, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def train_tokenizer():
    return _tool("train_tokenizer")


@pytest.fixture(scope="module")
def preprocess_data():
    return _tool("preprocess_data")


def test_train_then_preprocess(tmp_path, write, sample_text, train_tokenizer, preprocess_data, capsys):
    src = write("a.txt", sample_text)
    prefix = str(tmp_path / "tok" / "a")
    assert train_tokenizer(["--input", src, "--model-prefix", prefix, "--vocab-size", "400"]) == 0
    assert capsys.readouterr().out == f"wrote {prefix}.model: vocab_size 400, end-of-document id 1\n"
    out = str(tmp_path / "ds")
    assert preprocess_data(["--input", src, "--output-prefix", out, "--tokenizer", prefix + ".model",
                            "--workers", "2", "--no-progress"]) == 0
    ds = IndexedDataset(out)
    assert capsys.readouterr().out == (f"wrote {out}.bin/.idx: {len(ds):,} documents, {ds.n_tokens:,} tokens "
                                       "(uint16), tokenizer a.model\n")
    assert load_tokenizer(prefix + ".model").decode(ds.doc(0).tolist()) == sample_text.split("\n\n")[0]


def test_builtin_corpus_when_no_input(tmp_path, preprocess_data, capsys):
    assert preprocess_data(["--output-prefix", str(tmp_path / "b"), "--no-progress"]) == 0
    assert "tokens (uint8), tokenizer byte" in capsys.readouterr().out


def test_errors_are_one_line_exit_2(tmp_path, write, train_tokenizer, preprocess_data, capsys):
    missing = str(tmp_path / "missing.txt")
    assert preprocess_data(["--input", missing, "--output-prefix", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == f"error: {missing}: no such file\n"
    tiny = write("tiny.txt", "hello\n")
    assert train_tokenizer(["--input", tiny, "--model-prefix", str(tmp_path / "t"), "--vocab-size", "512"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 't'}.model: sentencepiece training failed: "
                                              "Vocabulary size too high (512).")
    assert sorted(os.listdir(tmp_path)) == ["tiny.txt"]

"""Bad input to launch/pretrain.py: a one-line `error: ...` naming the file or field, exit code 2."""
import pytest

from megams.training.trainer import main
from tests.training.common import tiny_args


def _run(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    return rc, errors


@pytest.mark.parametrize("extra,expected", [
    (["model.type=gpt5"], "model.type: Input should be 'vanilla', 'bottom_up', 'top_down' or 'retina' (got 'gpt5')"),
    (["data.seq_len=60"], "data.seq_len=60 is not divisible by the product of model.shorten_factors [4, 4] = 16"),
    (["training.precision=fp16"], "training.precision=fp16 needs a CUDA GPU"),
])
def test_config_errors(capsys, tmp_path, extra, expected):
    rc, errors = _run(capsys, tiny_args("bottom_up", str(tmp_path / "run"), extra=extra))
    assert rc == 2 and len(errors) == 1 and expected in errors[0]


def test_data_file_errors(capsys, tmp_path):
    missing = tmp_path / "missing.txt"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "blob.bin.txt"
    binary.write_bytes(bytes(range(256)) * 20)
    for path, what in [(missing, "no such file"), (empty, "empty"), (binary, "binary")]:
        rc, errors = _run(capsys, tiny_args("vanilla", str(tmp_path / "run"), extra=[f"data.path={path}"]))
        assert rc == 2 and len(errors) == 1, errors
        assert str(path) in errors[0] and what in errors[0], errors[0]


def test_tokenizer_that_does_not_match_the_dataset(capsys, tmp_path):
    from megams.data.preprocess import preprocess_documents
    from megams.data.tokenizers import train_sentencepiece
    from megams.data.corpus import builtin_corpus
    docs = builtin_corpus().documents[:40]
    src = tmp_path / "docs.txt"
    src.write_text("\n\n".join(docs))
    prefix = str(tmp_path / "bytes")
    preprocess_documents(docs, prefix, tokenizer_spec="byte", progress=False)
    sp = train_sentencepiece([str(src)], str(tmp_path / "sp"), vocab_size=400)
    rc, errors = _run(capsys, tiny_args("vanilla", str(tmp_path / "run"),
                                        extra=[f"data.path={prefix}", f"data.tokenizer={sp}", "model.vocab_size=512"]))
    assert rc == 2 and len(errors) == 1
    assert "bytes.idx" in errors[0] and "tokenizer" in errors[0]

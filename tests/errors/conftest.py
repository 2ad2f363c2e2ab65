"""Inputs shared by the catalogue tests, made once per session: a small text file, its byte-level and
sentencepiece indexed datasets, the sentencepiece model, and one tiny trained run with a checkpoint.
Tests that damage something damage a copy."""
import os
import shutil

import pytest

from tests.errors.catalogue import entry_id_of, read_catalogue, run_trainer
from tests.training.common import tiny_args


@pytest.fixture
def entry(request):
    """The docs/ERRORS.md row of the requesting test (test_area__name -> area.name)."""
    name = entry_id_of(request.node.originalname)
    entries = read_catalogue()
    assert name in entries, f"{request.node.originalname}: no entry `{name}` in docs/ERRORS.md"
    return entries[name]


@pytest.fixture(scope="session")
def inputs(tmp_path_factory):
    return tmp_path_factory.mktemp("catalogue-inputs")


@pytest.fixture(scope="session")
def text_file(inputs):
    """About 30 KB of real text (the first documents of the built-in corpus)."""
    from megams.data import builtin_corpus
    path = inputs / "docs.txt"
    path.write_text("\n\n".join(builtin_corpus().documents[:40]), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def byte_dataset(inputs, text_file):
    """PREFIX of the text file tokenized into bytes (uint8)."""
    from megams.data.preprocess import preprocess
    prefix = str(inputs / "bytes")
    preprocess([text_file], prefix, "byte", progress=False)
    return prefix


@pytest.fixture(scope="session")
def sp_model(inputs, text_file):
    """A 400-piece sentencepiece model trained on the text file (a fraction of a second)."""
    from megams.data import train_sentencepiece
    return train_sentencepiece([text_file], str(inputs / "sp"), 400)


@pytest.fixture(scope="session")
def sp_dataset(inputs, text_file, sp_model):
    """PREFIX of the text file tokenized with the sentencepiece model (uint16)."""
    from megams.data.preprocess import preprocess
    prefix = str(inputs / "sp_tokens")
    preprocess([text_file], prefix, sp_model, progress=False)
    return prefix


@pytest.fixture
def copy_dataset(tmp_path):
    """copy_dataset(prefix) -> PREFIX of a private copy (to damage)."""
    def _copy(prefix):
        dst = str(tmp_path / os.path.basename(prefix))
        for ext in (".bin", ".idx"):
            shutil.copy(prefix + ext, dst + ext)
        return dst
    return _copy


class _Capture:
    """capsys stand-in for a session fixture (pytest captures the output anyway)."""

    def readouterr(self):
        return "", ""


@pytest.fixture(scope="session")
def trained_run(inputs):
    """RUN_DIR of a tiny vanilla run (2 steps, d_model 32) with its checkpoint at step 2; about 3 s."""
    run_dir = str(inputs / "run")
    saved = dict(os.environ)  # main() exports RANK/WORLD_SIZE/... as a launcher would
    try:
        outcome = run_trainer(_Capture(), trained_args(inputs, run_dir))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert outcome.rc == 0
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "step_00000002", "megams.json"))
    return run_dir


def trained_args(inputs, run_dir, *extra):
    """argv of the trained run's config (with `run_dir`), plus overrides."""
    return tiny_args("vanilla", str(run_dir), steps=2, extra=[
        "checkpoint.interval=0", "training.eval_batches=1", f"data.cache_dir={inputs / 'cache'}",
        "data.num_workers=1", *extra])

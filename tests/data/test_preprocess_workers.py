"""Tokenizer workers: a worker that dies ends preprocessing with a DataError, never a hang, and workers
are not forks of the caller (a forked training process can die in its at-fork handlers)."""
import os
import threading

import pytest

from megams.data import preprocess as pp
from megams.data.errors import DataError


def _die(_chunk):
    os._exit(3)


def test_a_dead_worker_is_an_error_not_a_hang(tmp_path, monkeypatch):
    monkeypatch.setattr(pp, "_encode_chunk", _die)
    docs = ["some text %d" % i for i in range(100)]
    result = {}

    def run():
        try:
            pp.preprocess_documents(docs, str(tmp_path / "out"), "byte", workers=2, progress=False, source="docs")
        except Exception as e:  # noqa: BLE001 - recorded and checked below
            result["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(120)
    assert not t.is_alive(), "preprocessing hung on a dead worker"
    assert isinstance(result.get("error"), DataError)
    assert "worker process died" in str(result["error"]) and "docs" in str(result["error"])
    assert not list(tmp_path.glob("out*.bin")) and not list(tmp_path.glob("out*.idx"))  # nothing written


def test_workers_are_not_forks_of_the_caller():
    assert pp._pool_context().get_start_method() in ("forkserver", "spawn")


def test_same_output_for_any_worker_count(tmp_path):
    docs = ["doc %d " % i * (i % 7 + 1) for i in range(3000)]
    for w in (1, 2):
        pp.preprocess_documents(docs, str(tmp_path / f"w{w}"), "byte", workers=w, progress=False)
    assert (tmp_path / "w1.bin").read_bytes() == (tmp_path / "w2.bin").read_bytes()
    assert len((tmp_path / "w1.bin").read_bytes()) == sum(len(d) + 1 for d in docs)

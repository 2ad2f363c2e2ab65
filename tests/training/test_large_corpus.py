"""Issue 12: a 2-rank run whose `data.path` is a 40 MB text file completes with a 2-second collective
timeout. Rank 0 tokenizes the corpus (tens of seconds here) while rank 1 waits on the rendezvous store,
not in a collective, and says what rank 0 is doing. Before the fix rank 1 waited in an all_reduce
and the run died with exit 5 after 2 s."""
import os

import pytest

from tests.helpers.ranks_launch import RankJob
from tests.training.common import ROOT, read_metrics, tiny_args

SHAKESPEARE = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare", "input.txt")


@pytest.fixture(scope="module")
def corpus_40mb(tmp_path_factory):
    if not os.path.isfile(SHAKESPEARE):
        pytest.skip("../shared/data is not here")
    text = open(SHAKESPEARE, encoding="utf-8").read()
    path = tmp_path_factory.mktemp("corpus") / "big.txt"
    with open(path, "w", encoding="utf-8") as f:
        n = 0
        while n < 40 * 2**20:
            f.write(text)
            f.write("\n\n")
            n += len(text) + 2
    return str(path)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A 400-piece sentencepiece model: tokenizing 40 MB with it takes tens of seconds on rank 0."""
    from megams.data import train_sentencepiece
    return train_sentencepiece([SHAKESPEARE], str(tmp_path_factory.mktemp("sp") / "sp"), 400)


@pytest.mark.slow
def test_two_ranks_tokenizing_40mb_with_a_2s_collective_timeout(corpus_40mb, sp_model, tmp_path):
    run_dir = str(tmp_path / "run")
    argv = tiny_args("vanilla", run_dir=run_dir, steps=2,
                     extra=[f"data.path={corpus_40mb}", f"data.cache_dir={tmp_path / 'cache'}",
                            f"data.tokenizer={sp_model}", "model.vocab_size=400",
                            "training.collective_timeout_s=2", "checkpoint.interval=0"])
    env = {"MEGAMS_DATA_WAIT_SAY_S": "3"}  # say what rank 0 does every 3 s (default 30)
    with RankJob(argv, 2, tmp_path / "logs", env=env) as job:
        codes = job.wait(timeout=600, why="40 MB corpus")
        assert codes == [0, 0], job.tails()
        waiting = job.output(1)
    steps, evals = read_metrics(run_dir)
    assert [r["step"] for r in steps] == [1, 2] and evals
    # rank 1 said so at least once after 3 s: it waited longer than the 2 s collective timeout, and the run lived
    assert "for rank 0, which is preparing data: " in waiting and "big.txt (40." in waiting, waiting[-2000:]

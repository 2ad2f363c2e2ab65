import numpy as np
import pytest

from megams.data import GPTDataset, IndexedDataset, IndexedDatasetWriter
from megams.data.gpt_dataset import build_splits, split_bounds


@pytest.fixture
def stream(tmp_path):
    """An indexed dataset of 1003 tokens in 7 documents; token value = position mod 251."""
    tokens = np.arange(1003) % 251
    cuts = [0, 100, 101, 350, 600, 700, 999, 1003]
    with IndexedDatasetWriter(str(tmp_path / "s"), 256) as w:
        for a, b in zip(cuts, cuts[1:]):
            w.add_document(tokens[a:b], b - a)
    return IndexedDataset(str(tmp_path / "s"))


def test_split_bounds_are_contiguous_train_first():
    assert split_bounds(1000, [0.9, 0.1, 0.0]) == [(0, 900), (900, 1000), (1000, 1000)]
    assert split_bounds(1003, [8, 1, 1]) == [(0, 802), (802, 903), (903, 1003)]


def test_windows_cover_each_split(stream):
    T = 15
    parts = build_splits(stream, T, [0.8, 0.1, 0.1], seed=0, source="s")
    for (a, b), ds in zip(split_bounds(stream.n_tokens, [0.8, 0.1, 0.1]), parts):
        n = (b - a) // (T + 1)
        assert len(ds) == n and (ds.start, ds.end) == (a, b)
        windows = np.concatenate([ds.window(i) for i in range(n)])  # non-overlapping, in order, no gaps
        np.testing.assert_array_equal(windows, stream.tokens[a:a + n * (T + 1)])
    train, valid, test = parts
    assert train.shuffle and not valid.shuffle and not test.shuffle
    np.testing.assert_array_equal(valid.sample(2), valid.window(2))  # evaluation reads in order
    assert build_splits(stream, T, [0.9, 0.1, 0.0], 0, "s")[2] is None


def test_shuffle_deterministic_by_seed_and_epoch_wise(stream):
    T = 9
    a, b, c = (GPTDataset(stream, T, seed=s) for s in (3, 3, 4))
    n = len(a)
    order = [a.window_index(g) for g in range(3 * n)]
    assert order == [b.window_index(g) for g in range(3 * n)]              # same seed: same order
    assert order[:n] != [c.window_index(g) for g in range(n)]              # other seed: other order
    for e in range(3):                                                      # each epoch: a permutation
        epoch = order[e * n:(e + 1) * n]
        assert sorted(epoch) == list(range(n))
        assert epoch == np.random.default_rng([3, e]).permutation(n).tolist()
    assert order[:n] != order[n:2 * n]
    # random access: sample g is defined alone (a fresh object asked for a late sample first agrees)
    fresh = GPTDataset(stream, T, seed=3)
    np.testing.assert_array_equal(fresh.sample(2 * n + 5), a.window(order[2 * n + 5]))


def test_target_bytes(stream):
    ds = GPTDataset(stream, 9, shuffle=False)
    # every document's bytes = its tokens here, so a window's 9 targets stand for 9 bytes
    assert [ds.target_bytes(g) for g in range(3)] == [9.0, 9.0, 9.0]

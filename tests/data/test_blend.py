import numpy as np
import pytest

from megams.data import BlendedDataset, GPTDataset, IndexedDataset, IndexedDatasetWriter


def _dataset(tmp_path, name, value, n_windows, T=7):
    with IndexedDatasetWriter(str(tmp_path / name), 256) as w:
        w.add_document(np.full(n_windows * (T + 1), value), n_windows * (T + 1))
    return GPTDataset(IndexedDataset(str(tmp_path / name)), T, seed=1)


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1.0, 1.0, 7.0], [0.01, 0.98, 0.01]])
def test_proportions_follow_weights_in_every_prefix(tmp_path, weights):
    parts = [_dataset(tmp_path, f"d{i}", i + 1, 10 + i) for i in range(3)]
    blend = BlendedDataset(parts, weights)
    w = np.asarray(weights) / sum(weights)
    n = 5000
    chosen = np.array([blend.locate(g)[0] for g in range(n)])
    counts = np.cumsum(np.eye(3)[chosen], axis=0)
    assert np.abs(counts - np.arange(1, n + 1)[:, None] * w).max() < 1  # never a whole sample off
    # each dataset's samples are handed out in its own order, once each, wrapping epochs
    for i in range(3):
        assert [blend.locate(g)[1] for g in np.flatnonzero(chosen == i)] == list(range(int(counts[-1, i])))


def test_deterministic_and_random_access(tmp_path):
    parts = [_dataset(tmp_path, f"d{i}", i + 1, 5) for i in range(2)]
    a, b = BlendedDataset(parts, [2, 1]), BlendedDataset(parts, [2, 1])
    late = b.sample(9000)                      # b decides 9000 samples first, a goes in order
    seq = [a.locate(g) for g in range(9001)]
    assert seq == [b.locate(g) for g in range(9001)]
    i, k = seq[9000]
    np.testing.assert_array_equal(late, parts[i].sample(k))
    assert late[0] == i + 1

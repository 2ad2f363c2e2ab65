import numpy as np
import pytest
import torch

from megams.data import DataError, GlobalBatches, GPTDataset, IndexedDataset, IndexedDatasetWriter, eval_batches

T = 7


@pytest.fixture
def dataset(tmp_path):
    """40 windows of the tokens 0, 1, 2, ...: every sample is distinct."""
    with IndexedDatasetWriter(str(tmp_path / "ds"), 70000) as w:
        w.add_document(np.arange(40 * (T + 1)), 40 * (T + 1))
    return GPTDataset(IndexedDataset(str(tmp_path / "ds")), T, seed=5)


def _rows(batches):
    return [tuple(x.tolist()) + (int(y[-1]),) for inputs, targets in batches for x, y in zip(inputs, targets)]


def test_inputs_and_targets_shifted(dataset):
    inputs, targets = GlobalBatches(dataset, T, 4, 2).micro_batches(0)[0]
    assert inputs.dtype == targets.dtype == torch.long and inputs.shape == targets.shape == (2, T)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert torch.equal(torch.cat([inputs[0], targets[0, -1:]]), torch.from_numpy(dataset.sample(0)))


@pytest.mark.parametrize("step", [0, 3, 11])  # step 11 lies in the third epoch
def test_same_samples_whatever_the_layout(dataset, step):
    G = 8
    expected = sorted(tuple(dataset.sample(g).tolist()) for g in range(step * G, (step + 1) * G))
    for dp_size, micro in [(1, 8), (1, 2), (2, 4), (2, 1), (4, 2), (4, 1), (8, 1)]:
        rows = []
        for rank in range(dp_size):
            gb = GlobalBatches(dataset, T, G, micro, rank, dp_size)
            batches = gb.micro_batches(step)
            assert len(batches) == G // (micro * dp_size) and all(b[0].shape == (micro, T) for b in batches)
            rows += _rows(batches)
        assert sorted(rows) == expected, (dp_size, micro)


def test_rank_takes_contiguous_slice_of_each_micro_step(dataset):
    gb = GlobalBatches(dataset, T, 8, 2, dp_rank=1, dp_size=2)
    assert gb.sample_ids(16) == [[18, 19], [22, 23]]


def test_exact_resume(dataset):
    run = GlobalBatches(dataset, T, 6, 3, 1, 2)
    for _ in range(9):
        run.next()
    state = run.state_dict()
    assert state["consumed_samples"] == 54 and run.step == 9
    resumed = GlobalBatches(GPTDataset(dataset.indexed, T, seed=5), T, 6, 3, 1, 2)
    resumed.load_state_dict(state)
    for step in (9, 10, 11):
        expect = run.next()
        got = resumed.next()
        assert _rows(got) == _rows(expect) == _rows(resumed.micro_batches(step))


def test_resume_with_another_seed_fails(dataset):
    state = GlobalBatches(dataset, T, 4, 2).state_dict()
    other = GlobalBatches(GPTDataset(dataset.indexed, T, seed=6), T, 4, 2)
    with pytest.raises(DataError) as e:
        other.load_state_dict(state)
    assert str(e.value) == ("data state in the checkpoint has seed=5, this run has seed=6: resuming would not "
                            "continue the same sample order")


def test_eval_batches_in_order_and_layout_independent(dataset):
    valid = GPTDataset(dataset.indexed, T, shuffle=False, name="valid")
    one = eval_batches(valid, 3, 4)
    assert len(one) == 3 and _rows(one) == [tuple(valid.window(i).tolist()) for i in range(12)]
    assert one.n_tokens == 12 * T and one.bytes_per_token == pytest.approx(1.0)
    rows = []
    for rank in range(4):
        part = eval_batches(valid, 3, 4, rank, 4)
        assert part.bytes_per_token == one.bytes_per_token and part.n_tokens == one.n_tokens
        rows += _rows(part)
    assert sorted(rows) == sorted(_rows(one))
    assert len(eval_batches(valid, 100, 8)) == 5  # as many as the split holds

"""The background prefetcher: same batches in the same order as the synchronous path, ahead of
the consumer, exceptions re-raised in the consumer, clean shutdown (CPU; CUDA in tests/gpu)."""
import threading
import time

import pytest
import torch

from megams.config import load_config
from megams.training.prefetch import PrefetchedBatches, Prefetcher


def steps(n, micro=2, started=None):
    for i in range(n):
        if started is not None:
            started.append(i)
        yield [(torch.full((2, 3), 10 * i + m), torch.full((2, 3), -(10 * i + m))) for m in range(micro)]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_same_batches_in_order(depth):
    with Prefetcher(steps(5), "cpu", depth=depth) as it:
        got = list(it)
    want = list(steps(5))
    assert len(got) == 5
    for g, w in zip(got, want):
        assert all(torch.equal(a, b) and torch.equal(c, d) for (a, c), (b, d) in zip(g, w))
    assert it.delivered == 5


def test_builds_ahead_of_the_consumer():
    started = []
    it = Prefetcher(steps(10, started=started), "cpu", depth=2)
    try:
        deadline = time.time() + 10
        while len(started) < 3 and time.time() < deadline:  # 2 queued + 1 being built (blocked on put)
            time.sleep(0.01)
        time.sleep(0.1)
        assert len(started) == 3, started  # bounded by depth: never more than depth + 1 ahead
        next(it)
        deadline = time.time() + 10
        while len(started) < 4 and time.time() < deadline:
            time.sleep(0.01)
        assert len(started) == 4
    finally:
        it.close()


def test_synchronous_when_depth_zero():
    started = []
    it = Prefetcher(steps(3, started=started), "cpu", depth=0)
    time.sleep(0.05)
    assert started == [] and it._thread is None
    next(it)
    assert started == [0]


def test_exception_in_thread_reraised_in_consumer_after_earlier_steps():
    def broken():
        yield from steps(2)
        raise ValueError("corrupt shard data/x.bin")

    it = Prefetcher(broken(), "cpu", depth=4)
    next(it), next(it)
    with pytest.raises(ValueError, match="corrupt shard data/x.bin"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)
    it.close()


def test_close_joins_a_thread_blocked_on_a_full_queue():
    def endless():
        i = 0
        while True:
            i += 1
            yield [(torch.zeros(1), torch.zeros(1))]

    before = threading.active_count()
    it = Prefetcher(endless(), "cpu", depth=1)
    next(it)
    time.sleep(0.1)  # the thread fills the queue and blocks
    thread = it._thread
    it.close()
    assert not thread.is_alive()
    assert threading.active_count() == before
    with pytest.raises(StopIteration):
        next(it)


def test_negative_depth_refused():
    with pytest.raises(ValueError, match="data.prefetch"):
        Prefetcher(steps(1), "cpu", depth=-1)


def test_config_field(tmp_path):
    cfg = load_config("configs/tiny/bottom_up.yaml")
    assert cfg.data.prefetch == 2
    assert load_config("configs/tiny/bottom_up.yaml", ["data.prefetch=0"]).data.prefetch == 0
    with pytest.raises(Exception, match="data.prefetch"):
        load_config("configs/tiny/bottom_up.yaml", ["data.prefetch=-1"])


class _Data:
    seed, seq_len = 0, 4

    def __len__(self):
        return 1000

    def sample(self, i):
        import numpy as np
        return np.arange(i, i + 5, dtype=np.int64)


def test_prefetched_global_batches_keep_the_consumer_position():
    from megams.data.batches import GlobalBatches
    ref = GlobalBatches(_Data(), 4, 8, 2)
    train = GlobalBatches(_Data(), 4, 8, 2)
    feed = PrefetchedBatches(train, "cpu", depth=3)
    try:
        for step in range(4):
            got, want = feed.next(), ref.next()
            assert train.consumed_samples == ref.consumed_samples == 8 * (step + 1)  # not the thread's
            assert all(torch.equal(a, b) and torch.equal(c, d) for (a, c), (b, d) in zip(got, want))
        time.sleep(0.05)
        assert train.state_dict() == ref.state_dict()
        train.consumed_samples = ref.consumed_samples = 80  # a load moved the position: restart there
        got, want = feed.next(), ref.next()
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(got, want))
    finally:
        feed.close()

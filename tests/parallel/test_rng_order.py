"""The RNG tracker switches the CUDA generator whatever the order of seeding, CUDA's
initialisation and set_device (simulated on CPU: torch.cuda's RNG functions are replaced by
CPU generators, one per fake device)."""
import pytest
import torch

from megams.parallel import random as prng


class FakeCuda:
    """torch.cuda's RNG surface over CPU generators; `initialised` flips like CUDA's lazy init."""

    def __init__(self, monkeypatch, device: int = 0):
        self.device, self.initialised, self.default = device, False, {}
        real_generator = torch.Generator

        def generator(device="cpu"):
            return real_generator()  # a private "cuda" generator: same Philox-free stand-in, on CPU

        def gen(key):
            key = key if isinstance(key, str) else f"cuda:{self.device}"
            if key not in self.default:
                self.default[key] = real_generator().manual_seed(12345)
            self.initialised = True
            return self.default[key]

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: self.initialised)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.device)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": gen(device).get_state())
        monkeypatch.setattr(torch.cuda, "set_rng_state",
                            lambda state, device="cuda": gen(device).set_state(state))
        monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: None)  # the real one queues a lazy call
        monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: None)
        monkeypatch.setattr(prng.torch, "Generator", generator)
        self.gen = gen

    def draw(self, n: int = 4) -> torch.Tensor:
        """What a dropout mask drawn on the current fake device would consume."""
        return torch.rand(n, generator=self.gen(f"cuda:{self.device}"))


def _expected(seed: int, n: int = 4) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("order", ["seed_then_cuda_init", "cuda_init_then_seed", "seed_then_set_device"])
def test_fork_switches_cuda_stream_in_any_order(monkeypatch, order):
    cuda = FakeCuda(monkeypatch)
    tracker = prng.RNGStatesTracker()
    if order == "cuda_init_then_seed":
        cuda.draw(0)  # CUDA initialised first (the only order the old tracker handled)
    tracker.add("mp", 777)
    if order == "seed_then_set_device":
        cuda.device = 1  # torch.cuda.set_device(local_rank) after seeding
    before = cuda.gen(f"cuda:{cuda.device}").get_state()
    with tracker.fork("mp"):
        inside = cuda.draw()
    assert torch.equal(inside, _expected(777)), "the fork did not switch the CUDA generator to the stream's seed"
    # the default CUDA stream is left where it was, and the stream continues where it stopped
    assert torch.equal(cuda.gen(f"cuda:{cuda.device}").get_state(), before)
    with tracker.fork("mp"):
        again = cuda.draw()
    assert torch.equal(again, torch.rand(8, generator=torch.Generator().manual_seed(777))[4:])


def test_add_does_not_reseed_default_streams(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    cpu_before, cuda_before = torch.get_rng_state(), cuda.gen("cuda:0").get_state()
    tracker = prng.RNGStatesTracker()
    tracker.add("mp", 5)
    assert torch.equal(torch.get_rng_state(), cpu_before)
    assert torch.equal(cuda.gen("cuda:0").get_state(), cuda_before)


def test_replayed_states_repeat_cuda_draws(monkeypatch):
    """Activation recomputation: states saved before the first fork give the same CUDA draws again."""
    cuda = FakeCuda(monkeypatch)
    tracker = prng.RNGStatesTracker()
    tracker.add("mp", 9)
    saved = tracker.get_states()
    with tracker.fork("mp"):
        first = cuda.draw()
    tracker.set_states(saved)
    with tracker.fork("mp"):
        second = cuda.draw()
    assert torch.equal(first, second)


def test_cpu_only_fork_unchanged():
    tracker = prng.RNGStatesTracker()
    tracker.add("mp", 3)
    before = torch.get_rng_state()
    with tracker.fork("mp"):
        inside = torch.rand(4)
    assert torch.equal(inside, _expected(3))
    assert torch.equal(torch.get_rng_state(), before)

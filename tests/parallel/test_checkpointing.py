"""Activation checkpointing (`apply_ac`) in one process: every mode gives the same loss and
gradients as no checkpointing, bit for bit, with dropout on (recomputation replays the RNG), and
saves less for backward. DeepSpeed's partitioned / CPU checkpointing and checkpointing inside
pipelines run in tests/parallel/test_pipeline.py against the same single-process reference."""
import copy

import pytest
import torch

from megams.config.schema import ActivationCheckpointConfig, Config, DataConfig, ParallelConfig
from megams.models import build_model
from megams.parallel.checkpointing import apply_ac, checkpointed_modules, is_checkpointed
from megams.training.loss import lm_loss
from tests.models.cases import tiny

T = 32
MODES = [("full", {}), ("attention", {}), ("every_k", {"every_k": 2})]


def _cfg(mc, mode, **kw):
    return Config(model=mc, data=DataConfig(seq_len=T, tokenizer="tokenizer.model"),
                  parallel=ParallelConfig(activation_checkpointing=ActivationCheckpointConfig(mode=mode, **kw)))


def _saved_bytes_and_grads(model, x, y, seed=7):
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t
    torch.manual_seed(seed)  # dropout masks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = lm_loss(model(x), y)
    loss.backward()
    return loss.detach(), sum(saved), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode,kw", MODES, ids=[m for m, _ in MODES])
@pytest.mark.parametrize("model_type", ["vanilla", "bottom_up", "top_down", "retina"])
def test_checkpointing_changes_memory_not_gradients(model_type, mode, kw):
    mc = tiny(model_type, vocab_size=256, dropout=0.1, n_layers=3)
    plain, ckpt = build_model(mc, seed=1), build_model(mc, seed=1)
    apply_ac(ckpt, _cfg(mc, mode, **kw))
    targets = checkpointed_modules(ckpt, mode, kw.get("every_k", 1))
    assert targets and all(is_checkpointed(m) for m in targets)
    assert sum(is_checkpointed(m) for m in ckpt.modules()) == len(targets)
    ids = torch.randint(0, 256, (2, T + 1), generator=torch.Generator().manual_seed(0))
    x, y = ids[:, :-1], ids[:, 1:]
    loss0, bytes0, g0 = _saved_bytes_and_grads(plain.train(), x, y)
    loss1, bytes1, g1 = _saved_bytes_and_grads(ckpt.train(), x, y)
    assert torch.equal(loss0, loss1)
    for name, g in g0.items():
        assert torch.equal(g, g1[name]), name
    assert bytes1 < bytes0
    with torch.no_grad():  # evaluation runs the plain forward
        assert torch.equal(plain.eval()(x), ckpt.eval()(x))


def test_checkpointed_model_keeps_names_and_deepcopies():
    mc = tiny("bottom_up", vocab_size=256)
    model = build_model(mc, seed=1)
    names = [n for n, _ in model.named_parameters()]
    apply_ac(model, _cfg(mc, "full"))
    assert [n for n, _ in model.named_parameters()] == names
    twin = copy.deepcopy(model)
    with torch.no_grad():
        next(twin.parameters()).add_(1.0)  # the copy's forward must use the copy's weights
    x = torch.randint(0, 256, (1, T))
    assert not torch.equal(twin(x), model(x))
    assert all(is_checkpointed(m) for m in checkpointed_modules(twin, "full"))

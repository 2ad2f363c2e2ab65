"""Incremental decoding (megams.inference) equals the full forward at every position, for every model
and option (pairwise by default, the full matrix under -m full), and sampling does what it says."""
import pytest
import torch

from megams.inference import generate, make_decoder, sample_next
from megams.models import build_model
from tests.models.cases import OPTIONS, case_id, cases, tiny

T = 29  # not a multiple of any K: exercises partial coarse blocks and retina windows


def _check(model_type, combo, seed=0):
    model = build_model(tiny(model_type, **combo), seed=seed).eval()
    tokens = torch.randint(0, model.cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full = model(tokens)
    dec = make_decoder(model)
    steps = torch.stack([dec.step(tokens[:, t]) for t in range(T)], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-5)


def _params(full):
    return [pytest.param(t, c, id=f"{t}-{case_id(c)}", marks=[pytest.mark.full] if full else [])
            for t in OPTIONS for c in cases(t, full=full)]


@pytest.mark.parametrize("model_type,combo", _params(False))
def test_cached_decoding_matches_full_forward(model_type, combo):
    _check(model_type, combo)


@pytest.mark.parametrize("model_type,combo", _params(True))
def test_cached_decoding_matches_full_forward_full_matrix(model_type, combo):
    _check(model_type, combo)


def test_retina_cache_stays_bounded():
    """Old keys leave the cache once no later query can see them: memory per layer is constant."""
    model = build_model(tiny("retina"), seed=1).eval()
    dec = make_decoder(model)
    for t in range(60):
        dec.step(torch.tensor([t % 64]))
    for state in dec.blocks.caches:
        held = [buf.end - buf.base for buf in state.levels]
        assert held[0] <= 4 + 2 and all(h <= 2 + 8 for h in held[1:]), held


def test_decoder_needs_eval_mode():
    with pytest.raises(ValueError, match="needs the model in eval mode"):
        make_decoder(build_model(tiny("vanilla")))


def test_sampling_controls():
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]] * 64)
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, temperature=0).tolist() == [2] * 64
    assert set(sample_next(logits, top_k=2, generator=g).tolist()) <= {2, 3}
    probs = logits[0].softmax(-1)  # top_p just above p(2): only token 2 survives
    assert set(sample_next(logits, top_p=float(probs[2]) - 1e-3, generator=g).tolist()) == {2}
    assert len(set(sample_next(logits, temperature=100.0, generator=g).tolist())) > 2
    with pytest.raises(ValueError):
        sample_next(logits, top_p=0.0)


def test_generate_is_seeded_and_cache_agrees_with_recompute():
    model = build_model(tiny("bottom_up"), seed=2).eval()
    prompt = torch.tensor([[1, 2, 3, 4, 5]])
    a = generate(model, prompt, 12, temperature=0.9, top_k=20, seed=7)
    b = generate(model, prompt, 12, temperature=0.9, top_k=20, seed=7)
    c = generate(model, prompt, 12, temperature=0.9, top_k=20, seed=7, cache=False)
    assert a.shape == (1, 17) and torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(a[:, :5], prompt)
    limited = generate(model, prompt, 12, temperature=5.0, seed=1, vocab_limit=10)
    assert int(limited[:, 5:].max()) < 10

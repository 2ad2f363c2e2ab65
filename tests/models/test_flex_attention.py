"""Masked attention through flex_attention (block mask) equals today's dense-mask SDPA path, for
upsampling attention and retina (CPU: eager flex_attention, forward only, as torch has no CPU backward
for it; forward + backward on CUDA in tests/gpu/test_gpu.py)."""
import pytest
import torch

from megams.config import load_config
from megams.models import build_model, layers
from megams.models.layers import Attention, masked_attention, set_masked_attention
from megams.models.retina_attention import RetinaAttention

pytestmark = pytest.mark.skipif(not layers._flex_available(), reason="torch without flex_attention")


@pytest.fixture(autouse=True)
def _restore_kernel():
    yield
    set_masked_attention("auto")


def _both(fn):
    """fn() under SDPA and under flex, with the same parameters and inputs: (out, grads) each."""
    results = []
    for kind in ("sdpa", "flex"):
        set_masked_attention(kind)
        results.append(fn())
    return results


def test_auto_is_sdpa_on_cpu():
    q = torch.randn(1, 2, 4, 8)
    assert not layers._use_flex(q, 0.0)
    set_masked_attention("flex")
    assert layers._use_flex(q, 0.0) and not layers._use_flex(q, 0.1)  # dropout: SDPA
    assert not layers._use_flex(q, 0.0, needs_grad=True)  # no CPU backward: SDPA


def test_upsampling_mask_equal():
    torch.manual_seed(0)
    m, k, d = 12, 4, 32
    attn = Attention(d, 4, rotary_base=10000.0)
    fine, coarse = torch.randn(2, m * k, d), torch.randn(2, m, d)
    i, j = torch.arange(m * k), torch.arange(m)
    mask = j[None, :] * k <= i[:, None]
    with torch.no_grad():
        ref, flex = _both(lambda: attn(fine, coarse, causal=False, mask=mask, q_pos=i, k_pos=j * k))
    torch.testing.assert_close(flex, ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(flex, attn(fine, coarse, causal=False, q_pos=i, k_pos=j * k).detach())  # mask matters


def test_retina_equal():
    torch.manual_seed(0)
    attn = RetinaAttention(32, 4, factors=(4,), windows=(8, 16), chunk=8, rotary_base=10000.0)
    x = torch.randn(2, 45, 32)  # not a multiple of the chunk: padded queries
    with torch.no_grad():
        ref, flex = _both(lambda: attn(x))
    torch.testing.assert_close(flex, ref, rtol=1e-5, atol=1e-5)


def test_flex_path_taken(monkeypatch):
    """The flex branch really runs (not a silent SDPA fallback)."""
    import torch.nn.attention.flex_attention as fa
    calls = []
    real = fa.flex_attention
    monkeypatch.setattr(fa, "flex_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    set_masked_attention("flex")
    q = torch.randn(1, 2, 16, 8)
    with torch.no_grad():
        masked_attention(q, q, q, torch.tril(torch.ones(16, 16, dtype=torch.bool)))
    assert calls


@pytest.mark.parametrize("config, overrides", [("retina", []), ("top_down", ["model.upsampling=attention"]),
                                               ("bottom_up", ["model.upsampling=attention"])])
def test_tiny_models_equal(monkeypatch, config, overrides):
    cfg = load_config(f"configs/tiny/{config}.yaml", overrides).model
    model = build_model(cfg, seed=0).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 64))
    masks = []
    real = layers._block_mask
    monkeypatch.setattr(layers, "_block_mask", lambda *a: masks.append(1) or real(*a))
    with torch.no_grad():
        ref, flex = _both(lambda: model(tokens))
    assert masks, "no masked attention in this model"
    torch.testing.assert_close(flex, ref, rtol=1e-5, atol=1e-5)


def test_block_mask_cached_by_value():
    mask = torch.tril(torch.ones(16, 16, dtype=torch.bool))
    q = torch.randn(1, 2, 16, 8)
    set_masked_attention("flex")
    layers._BLOCK_MASKS.clear()
    masked_attention(q, q, q, mask)
    first = next(iter(layers._BLOCK_MASKS.values()))[1]
    masked_attention(q, q, q, mask.clone())
    assert next(iter(layers._BLOCK_MASKS.values()))[1] is first
    other = mask.clone()
    other[5, 0] = False
    y = masked_attention(q, q, q, other)
    torch.testing.assert_close(y, torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=other))

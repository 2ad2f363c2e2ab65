"""Retina attention: the windows tile the past exactly once; the chunked kernel equals a dense
n x n reference (outputs and gradients); its memory grows linearly with the context."""
import math

import pytest
import torch

from megams.models.cost import saved_tensor_bytes
from megams.models.layers import Attention, apply_rotary
from megams.models.retina_attention import RetinaAttention, level_bounds, mean_visible_keys


def visible(i, factors, windows, last_all):
    """Reference rule, plain ints: per level s, the block indices query i sees (docs/MODELS_IMPL.md)."""
    Ks = [1, *factors]
    S = len(factors)
    hi, out = i + 1, []
    for s in range(S + 1):
        if s == S and last_all:
            lo = 0
        else:
            lo = hi - windows[s] * Ks[s]
            if s < S:
                lo = (lo // Ks[s + 1]) * Ks[s + 1]  # python // floors
            lo = max(lo, 0)
        out.append(list(range(lo // Ks[s], hi // Ks[s])))
        hi = lo
    return out


CONFIGS = [([4, 16], [16, 4, 4]), ([2, 8], [4, 2, 2]), ([3], [5, 2]), ([], [6]), ([4, 8, 32], [3, 1, 2, 1])]


@pytest.mark.parametrize("factors,windows", CONFIGS)
@pytest.mark.parametrize("last_all", [False, True])
def test_windows_tile_the_past_exactly_once(factors, windows, last_all):
    Ks = [1, *factors]
    bounds = level_bounds(torch.arange(300), factors, windows, last_all)
    for i in range(300):
        levels = visible(i, factors, windows, last_all)
        seen = [p for s, blocks in enumerate(levels) for b in blocks for p in range(b * Ks[s], (b + 1) * Ks[s])]
        assert len(seen) == len(set(seen)), f"i={i}: overlap"
        first = min(seen)
        assert sorted(seen) == list(range(first, i + 1)), f"i={i}: gap or beyond i"
        assert first == 0 or not last_all
        assert set(range(max(0, i - windows[0] + 1), i + 1)) <= set(levels[0]), "W_0 most recent at full res"
        for s in range(1, len(Ks)):  # full windows once the past is long enough
            if levels[s] and min(seen) > 0 and s < len(Ks) - 1:
                assert len(levels[s]) >= windows[s]
            assert len(levels[s]) <= windows[s] + (Ks[s + 1] // Ks[s] - 1 if s + 1 < len(Ks) else 0) or last_all
        for s, (lo, hi) in enumerate(bounds):  # the vectorised rule agrees
            assert list(range(lo[i] // Ks[s], hi[i] // Ks[s])) == levels[s]


def dense_reference(attn: RetinaAttention, x):
    """Dense n x n(+pooled) masked softmax: every query scores every key of every level."""
    B, n, d = x.shape
    hd, base = attn.head_dim, attn.rotary_base
    rot = (lambda t, pos: apply_rotary(t, pos, base)) if base is not None else (lambda t, pos: t)
    q = rot(attn.wq(x).view(B, n, -1, hd), torch.arange(n))
    keys, values, cols = [], [], []
    for s, K in enumerate([1, *attn.factors]):
        nb = n // K  # full blocks only: a partial block is never visible
        xs = torch.stack([x[:, b * K:(b + 1) * K].mean(1) for b in range(nb)], 1) if nb else x[:, :0]
        keys.append(rot(attn.wk(xs).view(B, nb, d // hd, hd), torch.arange(nb) * K + K - 1))
        values.append(attn.wv(xs).view(B, nb, d // hd, hd))
        cols += [(s, b) for b in range(nb)]
    k, v = torch.cat(keys, 1), torch.cat(values, 1)
    mask = torch.zeros(n, len(cols), dtype=torch.bool)
    col = {c: j for j, c in enumerate(cols)}
    for i in range(n):
        for s, blocks in enumerate(visible(i, attn.factors, attn.windows, attn.last_all)):
            for b in blocks:
                mask[i, col[(s, b)]] = True
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(hd)
    p = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    y = torch.einsum("bhij,bjhd->bihd", p, v).reshape(B, n, -1)
    return attn.wo(y)


def _attn(factors, windows, last="finite", chunk=None, rotary=True, d=16, heads=2):
    torch.manual_seed(0)
    return RetinaAttention(d, heads, factors, windows, last, chunk, rotary_base=10000.0 if rotary else None)


@pytest.mark.parametrize("n", [1, 5, 16, 37, 64, 100])
@pytest.mark.parametrize("factors,windows,last,chunk,rotary", [
    ([4, 16], [8, 2, 2], "finite", None, True),
    ([2, 8], [4, 2, 2], "all", 5, True),
    ([3], [5, 2], "finite", 7, False),
    ([4, 8, 32], [3, 1, 2, 1], "finite", 4, True),
])
def test_matches_dense_reference(n, factors, windows, last, chunk, rotary):
    attn = _attn(factors, windows, last, chunk, rotary).double()
    x = torch.randn(2, n, 16, dtype=torch.float64, requires_grad=True)
    y = attn(x)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *attn.parameters()], g)
    y_ref = dense_reference(attn, x)
    grads_ref = torch.autograd.grad(y_ref, [x, *attn.parameters()], g)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-9)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_huge_window_is_plain_causal_attention():
    attn = _attn([4], [64, 1])
    plain = Attention(16, 2, rotary_base=10000.0)
    plain.load_state_dict(attn.state_dict())
    x = torch.randn(2, 50, 16)
    torch.testing.assert_close(attn(x), plain(x), atol=1e-5, rtol=1e-5)


def test_memory_grows_linearly():
    """Saved-for-backward bytes grow <= 6x when the context grows 4x (windows << context);
    the dense reference (n^2) grows far more, so the measurement can tell them apart."""
    attn = _attn([4, 16], [8, 2, 2], chunk=8)
    params = list(attn.parameters())

    def saved(fn, n):
        x = torch.randn(1, n, 16, requires_grad=True)
        return saved_tensor_bytes(lambda: fn(x), exclude=params)

    short, long = saved(attn, 256), saved(attn, 1024)
    assert long <= 6 * short, (short, long)
    dense_short, dense_long = saved(lambda x: dense_reference(attn, x), 64), saved(lambda x: dense_reference(attn, x), 256)
    assert dense_long > 10 * dense_short, (dense_short, dense_long)


def test_mean_visible_keys():
    # far from the start: W_0 (+ alignment) + W_1 (+ alignment) + W_2 keys per query
    m = mean_visible_keys([4, 16], [16, 4, 4], False, 4096)
    assert 16 + 4 + 4 <= m <= 16 + 3 + 4 + 3 + 4
    assert mean_visible_keys([], [10_000], False, 100) == pytest.approx(50.5)  # plain causal

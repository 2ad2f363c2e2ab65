"""Every model x option: it builds, it learns, it is causal, and any length works at inference."""
import pytest
import torch
import torch.nn.functional as F

from megams.models import build_model
from tests.models.cases import OPTIONS, all_cases, case_id, cases, tiny

PAIRWISE = all_cases()


def _loss_falls(model_type, combo):
    torch.manual_seed(0)
    model = build_model(tiny(model_type, **combo), seed=1)
    start = torch.randint(0, 64, (4, 1), generator=torch.Generator().manual_seed(0))
    tokens = (start + torch.arange(33)) % 64  # learnable in a few steps: next = this + 1
    x, y = tokens[:, :-1], tokens[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses
    # every parameter takes part (a dead branch would keep a None or all-zero gradient)
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not dead, dead


def _causal(model_type, combo, T=45, rounds=3):
    """Changing token j leaves logits < j bit-identical; the logits at j do change."""
    model = build_model(tiny(model_type, **combo), seed=2).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(rounds):
            tokens = torch.randint(0, 64, (4, T), generator=g)
            js = torch.randint(0, T, (4,), generator=g)
            changed = tokens.clone()
            rows = torch.arange(4)
            changed[rows, js] = (tokens[rows, js] + 1 + torch.randint(0, 62, (4,), generator=g)) % 64
            a, b = model(tokens), model(changed)  # same shapes: same kernels, bit-comparable
            for r, j in enumerate(js.tolist()):
                assert torch.equal(a[r, :j], b[r, :j]), f"row {r}: logits before j={j} changed"
                assert not torch.equal(a[r, j], b[r, j]), f"row {r}: logits at j={j} ignore token j"


@pytest.mark.parametrize("model_type,combo", PAIRWISE)
def test_loss_falls(model_type, combo):
    _loss_falls(model_type, combo)


@pytest.mark.parametrize("model_type,combo", PAIRWISE)
def test_causal(model_type, combo):
    _causal(model_type, combo)


@pytest.mark.full
@pytest.mark.parametrize("model_type", list(OPTIONS))
@pytest.mark.parametrize("check", [_loss_falls, _causal], ids=["loss_falls", "causal"])
def test_full_matrix(check, model_type):
    failed = []
    for combo in cases(model_type, full=True):
        try:
            check(model_type, combo)
        except AssertionError as e:
            failed.append(f"{case_id(combo)}: {str(e).splitlines()[0]}")
    assert not failed, "\n".join(failed)


def test_causality_check_can_fail():
    """A model that leaks the future (bidirectional attention) must be caught by `_causal`."""
    import megams.models.layers as layers
    orig = layers.Attention.forward

    def leaky(self, x, context=None, *, causal=True, **kw):
        return orig(self, x, context, causal=False, **kw)

    layers.Attention.forward = leaky
    try:
        with pytest.raises(AssertionError, match="before j"):
            _causal("vanilla", {})
    finally:
        layers.Attention.forward = orig


@pytest.mark.parametrize("model_type,combo", [
    ("vanilla", {"positions": "learned"}),
    ("bottom_up", {"pooling": "attention", "upsampling": "attention"}),
    ("bottom_up", {"pooling": "linear", "upsampling": "linear", "positions": "learned"}),
    ("top_down", {"upsampling": "attention", "n_pre": 1}),
    ("retina", {"retina_chunk_size": 7}),
])
def test_any_length_matches_prefix(model_type, combo):
    """T not divisible by K_S: same logits as the prefix of a longer input (exact at equal padded length)."""
    model = build_model(tiny(model_type, **combo), seed=4).eval()
    tokens = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(tokens)
        same_pad = model(tokens[:, :40])  # 37 pads to 40 (K_S = 8)
        for T in (1, 7, 13, 37):
            out = model(tokens[:, :T])
            assert out.shape == (2, T, 64)
            torch.testing.assert_close(out, full[:, :T], atol=2e-5, rtol=1e-5)
        assert torch.equal(model(tokens[:, :37]), same_pad[:, :37])


def test_learned_positions_refuse_long_inputs():
    model = build_model(tiny("vanilla", positions="learned"))
    model(torch.zeros(1, 64, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input length 65 exceeds model.max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("model_type", ["vanilla", "bottom_up", "top_down", "retina"])
def test_contract(model_type):
    """What megams.parallel relies on: cfg, embed, head (tied), norm_f, forward_hidden, block lists."""
    cfg = tiny(model_type)
    model = build_model(cfg)
    assert model.cfg is cfg
    assert isinstance(model.embed, torch.nn.Embedding) and isinstance(model.head, torch.nn.Linear)
    assert model.head.weight is model.embed.weight
    tokens = torch.randint(0, 64, (2, 19))
    torch.testing.assert_close(model.head(model.forward_hidden(tokens)), model(tokens))
    lists = {"vanilla": ["blocks"], "retina": ["blocks"],
             "bottom_up": ["scale_blocks", "shorten", "upsample", "post_blocks"],
             "top_down": ["pre_blocks", "shorten", "scale_blocks", "upsample"]}[model_type]
    for name in lists:
        assert isinstance(getattr(model, name), torch.nn.ModuleList)
    for name, mod in model.named_modules():  # separate bias-free projections everywhere
        if name.endswith(("attn", "attn.wq")) and hasattr(mod, "wq"):
            assert {"wq", "wk", "wv", "wo"} <= set(dict(mod.named_children()))
            assert mod.wq.bias is None


def test_dropout_trains_and_eval_is_deterministic():
    model = build_model(tiny("bottom_up", dropout=0.2, pooling="attention", upsampling="attention"))
    tokens = torch.randint(0, 64, (2, 16))
    model.train()
    assert not torch.equal(model(tokens), model(tokens))
    model.eval()
    assert torch.equal(model(tokens), model(tokens))


@pytest.mark.parametrize("model_type,combo", [
    ("vanilla", {}), ("bottom_up", {"pooling": "attention", "upsampling": "attention", "shift_pad": "learned"}),
    ("top_down", {"upsampling": "linear", "shift_pad": "learned"}), ("retina", {"retina_chunk_size": 5}),
])
def test_bf16(model_type, combo):
    """bf16 autocast trains (every parameter gets a gradient); a pure-bf16 copy runs."""
    model = build_model(tiny(model_type, **combo))
    tokens = torch.randint(0, 64, (2, 37))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    pure = build_model(tiny(model_type, **combo)).to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(pure(tokens).float(), model(tokens).detach().float(), atol=0.05, rtol=0.05)

"""scales.Merge (issue 14): the coarse stream joins the finer one at the finer one's scale, in
top-down's merges and bottom-up's `sum` aggregation; its init, causality and decoding."""
import pytest
import torch

from megams.inference import make_decoder
from megams.models import build_model
from megams.models.cost import param_count
from megams.models.init import initializer
from tests.models.cases import tiny

MERGING = [("top_down", {}), ("top_down", {"upsampling": "attention"}), ("top_down", {"upsampling": "linear"}),
           ("bottom_up", {"aggregation": "sum"}), ("bottom_up", {"aggregation": "sum", "upsampling": "linear"})]


def _merges(model):
    return [up.merge for up in model.upsample if up.merge is not None]


@pytest.mark.parametrize("kind", ["norm", "gate"])
@pytest.mark.parametrize("model_type,combo", MERGING)
def test_every_merge_has_the_new_parameters_and_init(kind, model_type, combo):
    model = build_model(tiny(model_type, scale_merge=kind, **combo), seed=0)
    names = [n for n, _ in model.named_parameters() if ".merge." in n]
    assert len(_merges(model)) == len(model.upsample) and names
    std = model.cfg.init_std
    for m in _merges(model):
        if kind == "norm":  # gain = init_std (the embedding's scale), not a norm's usual 1
            assert torch.equal(m.norm.weight, torch.full_like(m.norm.weight, std))
        else:
            assert torch.equal(m.gate, torch.zeros_like(m.gate))
    assert param_count(model.cfg) == sum(p.numel() for p in model.parameters())


def test_no_merge_for_none_or_attention_aggregation():
    assert not _merges(build_model(tiny("top_down", scale_merge="none")))
    assert not _merges(build_model(tiny("bottom_up", aggregation="attention")))
    assert _merges(build_model(tiny("top_down")))[0].kind == "norm"  # the default (auto)
    assert _merges(build_model(tiny("bottom_up", aggregation="sum")))[0].kind == "norm"  # stable at its best lr


def test_init_rule_is_layout_independent():
    """The rule is a constant by name: the same value from a meta skeleton as from the model."""
    cfg = tiny("top_down")
    real, meta = build_model(cfg, seed=0), build_model(cfg, device="meta")
    value = initializer(meta, seed=0, std=cfg.init_std)
    for n, p in real.named_parameters():
        assert torch.equal(value(n, p.shape), p.detach()), n


@pytest.mark.parametrize("model_type,combo", MERGING)
def test_norm_merge_is_scale_free(model_type, combo):
    """The fix itself: a coarse stream 100x larger reaches the fine stream at the same size (it
    would be 100x larger with `none`, the mismatch issue 14 measured)."""
    def up(kind, scale):
        model = build_model(tiny(model_type, scale_merge=kind, **combo), seed=0).eval()
        u = model.upsample[0]
        coarse = torch.randn(2, 4, model.cfg.d_model, generator=torch.Generator().manual_seed(0))
        fine = torch.randn(2, 4 * u.k, model.cfg.d_model, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            return u.merged(coarse * scale).norm() / u.merged(coarse).norm()
    assert up("norm", 100.0) == pytest.approx(1.0, rel=1e-3)
    assert up("none", 100.0) == pytest.approx(100.0, rel=1e-3)


def _randomise_merges(model, seed):
    """Gains / gates away from their init (a zero gate would hide the coarse path from any test)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in _merges(model):
            for p in m.parameters():
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("kind", ["norm", "gate"])
@pytest.mark.parametrize("model_type,combo", MERGING)
def test_causal_and_decoding_with_trained_merges(kind, model_type, combo):
    model = _randomise_merges(build_model(tiny(model_type, scale_merge=kind, **combo), seed=2), 3).eval()
    T = 29
    tokens = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(4))
    changed = tokens.clone()
    changed[:, 17] = (changed[:, 17] + 5) % 64
    with torch.no_grad():
        full, other = model(tokens), model(changed)
    assert torch.equal(full[:, :17], other[:, :17]) and not torch.equal(full[:, 17], other[:, 17])
    dec = make_decoder(model)
    steps = torch.stack([dec.step(tokens[:, t]) for t in range(T)], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-5)
    # the merge is on the path: changing it changes the logits after the first coarse position
    with torch.no_grad():
        _merges(model)[0].parameters().__next__().mul_(2.0)
        assert not torch.allclose(model(tokens)[:, 8:], full[:, 8:])


def test_weights_from_before_the_merge_are_refused_with_the_fix():
    """A bottom-up (sum) checkpoint saved without merges, loaded under today's default (norm): the
    refusal names the missing merge parameters and how to load them as trained; with the fix it loads."""
    from megams.checkpoint.pretrained import CheckpointError, load_state
    old = build_model(tiny("bottom_up", aggregation="sum", scale_merge="none"), seed=0)
    tensors = dict(old.state_dict())
    with pytest.raises(CheckpointError, match=r"missing upsample\.0\.merge\.norm\.bias.*scale_merge.*none"):
        load_state(build_model(tiny("bottom_up", aggregation="sum"), seed=1), tensors, "ckpt")
    again = build_model(tiny("bottom_up", aggregation="sum", scale_merge="none"), seed=1)
    load_state(again, tensors, "ckpt")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), old.state_dict().values()))

"""Shorten / Upsample / Aggregation keep the causal contract of docs/MODELS.md."""
import pytest
import torch

from megams.models.scales import Aggregation, Shorten, Upsample
from tests.models.cases import tiny


def _init(module):
    torch.manual_seed(0)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return module


@pytest.mark.parametrize("pooling", ["avg", "linear", "attention"])
@pytest.mark.parametrize("shift_pad", ["zeros", "learned"])
def test_shorten_coarse_j_sees_fine_up_to_jk(pooling, shift_pad):
    k = 4
    shorten = _init(Shorten(tiny("bottom_up", pooling=pooling, shift_pad=shift_pad), k)).eval()
    x = torch.randn(2, 24, 32)
    y = shorten(x)
    assert y.shape == (2, 6, 32)
    for p in range(24):
        x2 = x.clone()
        x2[:, p] += 1.0
        y2 = shorten(x2)
        for j in range(6):
            if j * k < p:
                assert torch.equal(y[:, j], y2[:, j]), (p, j)
        j = (p + k - 1) // k  # the group that holds p after the shift (the last k-1 are dropped)
        assert j == 6 or not torch.equal(y[:, j], y2[:, j])


@pytest.mark.parametrize("upsampling", ["repeat", "linear", "attention"])
def test_upsample_fine_i_sees_coarse_j_with_jk_le_i(upsampling):
    k = 4
    up = _init(Upsample(tiny("bottom_up", upsampling=upsampling), k)).eval()
    coarse, fine = torch.randn(2, 5, 32), torch.randn(2, 20, 32)
    y = up(coarse, fine)
    assert y.shape == (2, 20, 32)
    for j in range(5):
        c2 = coarse.clone()
        c2[:, j] += 1.0
        y2 = up(c2, fine)
        for i in range(20):
            if j * k > i:
                assert torch.equal(y[:, i], y2[:, i]), (j, i)
        assert not torch.equal(y[:, j * k], y2[:, j * k])
    if upsampling == "attention":  # queries come from the fine stream, position by position
        f2 = fine.clone()
        f2[:, 7] += 1.0
        y2 = up(coarse, f2)
        assert torch.equal(y[:, :7], y2[:, :7]) and not torch.equal(y[:, 7], y2[:, 7])
    if upsampling == "repeat":
        assert torch.equal(y[:, 4:8], coarse[:, 1:2].expand(2, 4, 32))


@pytest.mark.parametrize("aggregation", ["sum", "attention"])
def test_aggregation_is_position_wise(aggregation):
    agg = _init(Aggregation(tiny("bottom_up", aggregation=aggregation), 3)).eval()
    h0, ups = torch.randn(2, 8, 32), [torch.randn(2, 8, 32) for _ in range(2)]
    y = agg(h0, ups)
    assert y.shape == (2, 8, 32)
    ups2 = [u.clone() for u in ups]
    ups2[1][:, 5] += 1.0
    y2 = agg(h0, ups2)
    assert torch.equal(y[:, :5], y2[:, :5]) and torch.equal(y[:, 6:], y2[:, 6:])
    assert not torch.equal(y[:, 5], y2[:, 5])
    if aggregation == "sum":
        torch.testing.assert_close(y, h0 + ups[0] + ups[1])

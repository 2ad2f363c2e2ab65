"""Initialisation depends only on (seed, parameter name, shape): not on device, order or layout."""
import math

import torch

from megams.models import build_model
from megams.models.init import normal_init
from tests.models.cases import tiny


def _params(model):
    return dict(model.named_parameters())


def test_same_seed_same_params_different_seed_differs():
    cfg = tiny("bottom_up", pooling="attention", upsampling="attention", shift_pad="learned")
    a, b, c = _params(build_model(cfg, seed=7)), _params(build_model(cfg, seed=7)), _params(build_model(cfg, seed=8))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)
    random = [n for n in a if a[n].std() > 0]  # norms are constant
    assert random and all(not torch.equal(a[n], c[n]) for n in random)


def test_values_are_a_function_of_seed_name_shape():
    cfg = tiny("vanilla", n_layers=3, tie_embeddings=False)
    model = build_model(cfg, seed=3)
    out_std = cfg.init_std / math.sqrt(2 * 3)
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p))
            continue
        std = out_std if name.rsplit(".", 2)[-2] in ("wo", "fc_out", "w_down") else cfg.init_std
        assert torch.equal(p, normal_init(3, name, p.shape, std)), name


def test_independent_of_the_rest_of_the_model():
    """Same name and shape in a differently shaped model (more layers, other options) -> same values."""
    a = _params(build_model(tiny("vanilla", n_layers=2), seed=1))
    b = _params(build_model(tiny("vanilla", n_layers=5, dropout=0.1, positions="learned"), seed=1))
    for name in ("embed.weight", "blocks.0.attn.wq.weight", "blocks.1.mlp.fc_in.weight"):
        assert torch.equal(a[name], b[name]), name
    # output projections differ only by the depth scale 1/sqrt(2L)
    torch.testing.assert_close(a["blocks.0.attn.wo.weight"] * math.sqrt(2 / 5), b["blocks.0.attn.wo.weight"])


def test_tied_head_and_meta_build():
    model = build_model(tiny("top_down"))
    assert model.head.weight is model.embed.weight
    meta = build_model(tiny("top_down"), device="meta")
    assert all(p.is_meta for p in meta.parameters())
    assert [n for n, _ in meta.named_parameters()] == [n for n, _ in model.named_parameters()]


def test_generator_seeds_are_distinct():
    """torch's CPU generator keeps 32 bits of a seed: (seed, name) must still map to distinct seeds."""
    from megams.models.init import param_seed
    names = [n for n, _ in build_model(tiny("bottom_up", pooling="attention"), device="meta").named_parameters()]
    seeds = {param_seed(s, n) for s in (0, 1, 2, 1 << 32) for n in names}
    assert len(seeds) == 4 * len(names) and all(0 <= s < 2 ** 32 for s in seeds)

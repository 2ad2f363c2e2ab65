"""The shipped model configs load, validate and build."""
import glob
import os

import pytest
import torch

from megams.config import load_config
from megams.models import build_model
from megams.models.cost import param_count

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = sorted(glob.glob(os.path.join(ROOT, "configs", "tiny", "*.yaml")))
PAPER = sorted(glob.glob(os.path.join(ROOT, "configs", "paper", "*.yaml")))


def test_all_present():
    names = {os.path.relpath(p, os.path.join(ROOT, "configs")) for p in TINY + PAPER}
    assert names >= {"tiny/vanilla.yaml", "tiny/bottom_up.yaml", "tiny/top_down.yaml", "tiny/retina.yaml",
                     "paper/vanilla_14l.yaml", "paper/bottom_up_30l.yaml", "paper/top_down_30l.yaml",
                     "paper/retina_30l.yaml"}


@pytest.mark.parametrize("path", TINY, ids=os.path.basename)
def test_tiny_config_builds_and_runs(path):
    cfg = load_config(path)
    if os.path.basename(path) in ("vanilla.yaml", "bottom_up.yaml", "top_down.yaml", "retina.yaml"):
        assert cfg.data.seq_len == 256 and cfg.model.d_model == 128 and cfg.training.precision == "fp32"
    model = build_model(cfg.model, seed=cfg.training.seed)
    assert param_count(cfg.model) == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert model(torch.zeros(1, 40, dtype=torch.long)).shape == (1, 40, cfg.model.vocab_size)
    if cfg.model.type == "retina":  # windows much shorter than the context
        w, f = cfg.model.retina_windows, cfg.model.retina_factors
        assert w[0] + sum(wi * k for wi, k in zip(w[1:], f)) < cfg.data.seq_len / 2


@pytest.mark.parametrize("path", PAPER, ids=os.path.basename)
def test_paper_config_builds(path):
    cfg = load_config(path)
    assert cfg.model.d_model == 1024 and cfg.model.n_heads == 16 and cfg.data.seq_len >= 512
    assert cfg.training.precision == "bf16"
    model = build_model(cfg.model, device="meta")  # shapes only: ~400M parameters
    assert param_count(cfg.model) == sum(p.numel() for p in model.parameters())
    expected_layers = 14 if cfg.model.type == "vanilla" else 30
    assert model.num_layers == expected_layers

"""training.fused_kernels: NVIDIA apex detected by its API (stand-in modules in sys.modules on CPU),
torch's kernels otherwise; a module named apex without the API is ignored or refused."""
import sys
import types

import pytest
import torch
from torch import nn

from megams.config import load_config
from megams.config.loader import ConfigError
from megams.models import build_model, layers
from megams.training import kernels
from megams.training.engine import build_optimizer

CFG = "configs/tiny/bottom_up.yaml"


def cfg(mode="auto"):
    return load_config(CFG, [f"training.fused_kernels={mode}"])


class FusedLayerNorm(nn.LayerNorm):
    pass


class FusedRMSNorm(nn.RMSNorm):
    pass


class FusedAdam(torch.optim.AdamW):
    def __init__(self, params, adam_w_mode=True, **kw):
        assert adam_w_mode
        super().__init__(params, **kw)


@pytest.fixture(autouse=True)
def _torch_norms():
    yield
    layers.set_norm_classes(None, None)


def _install(monkeypatch, api=True):
    apex = types.ModuleType("apex")
    apex.__file__ = "/site-packages/apex/__init__.py"
    monkeypatch.setitem(sys.modules, "apex", apex)
    if api:
        norm = types.ModuleType("apex.normalization")
        norm.FusedLayerNorm, norm.FusedRMSNorm = FusedLayerNorm, FusedRMSNorm
        opt = types.ModuleType("apex.optimizers")
        opt.FusedAdam = FusedAdam
        apex.normalization, apex.optimizers = norm, opt
        monkeypatch.setitem(sys.modules, "apex.normalization", norm)
        monkeypatch.setitem(sys.modules, "apex.optimizers", opt)
    else:  # like PyPI's unrelated "apex": importable, no NVIDIA API
        for m in ("apex.normalization", "apex.optimizers"):
            monkeypatch.delitem(sys.modules, m, raising=False)


def _no_apex(monkeypatch):
    monkeypatch.setitem(sys.modules, "apex", None)  # import apex -> ImportError


def test_auto_without_apex_is_torch(monkeypatch):
    _no_apex(monkeypatch)
    c = kernels.select(cfg(), "cpu")
    assert not c.uses_apex and c.optimizer_name == "torch AdamW"
    assert "not importable" in c.describe() and "fused_kernels=auto" in c.describe()
    c_gpu = kernels.select(cfg(), "cuda:0")
    assert c_gpu.optimizer_name == "torch AdamW (fused)"


def test_auto_with_apex_on_cuda_uses_it(monkeypatch):
    _install(monkeypatch)
    c = kernels.select(cfg(), "cuda:0")
    assert c.uses_apex
    assert "apex FusedLayerNorm/FusedRMSNorm" in c.describe() and "apex FusedAdam" in c.describe()
    c.install()
    model_cfg = load_config(CFG).model
    assert type(layers.make_norm(model_cfg)) is (FusedRMSNorm if model_cfg.norm == "rmsnorm" else FusedLayerNorm)
    opt = c.optimizer([nn.Parameter(torch.zeros(2))], lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    assert isinstance(opt, FusedAdam)


def test_auto_with_apex_on_cpu_is_torch(monkeypatch):
    _install(monkeypatch)
    c = kernels.select(cfg(), "cpu")
    assert not c.uses_apex and "CUDA kernels" in c.reason


def test_unrelated_apex_module_ignored_by_auto_refused_by_apex(monkeypatch):
    _install(monkeypatch, api=False)
    c = kernels.select(cfg(), "cuda:0")
    assert not c.uses_apex
    assert "is not NVIDIA apex" in c.reason and "apex.normalization.FusedLayerNorm" in c.reason
    with pytest.raises(ConfigError, match=r"training.fused_kernels=apex: the module 'apex' at .* is not NVIDIA apex"):
        kernels.select(cfg("apex"), "cuda:0")


def test_apex_requested_needs_apex_and_cuda(monkeypatch):
    _no_apex(monkeypatch)
    with pytest.raises(ConfigError, match="training.fused_kernels=apex: NVIDIA apex is not importable"):
        kernels.select(cfg("apex"), "cuda:0")
    _install(monkeypatch)
    with pytest.raises(ConfigError, match="need CUDA, the device is cpu"):
        kernels.select(cfg("apex"), "cpu")
    assert kernels.select(cfg("apex"), "cuda:0").uses_apex


def test_torch_never_uses_apex(monkeypatch):
    _install(monkeypatch)
    assert not kernels.select(cfg("torch"), "cuda:0").uses_apex


def test_fused_norms_same_parameters_and_outputs(monkeypatch):
    """A model built with the installed (stand-in) fused norms: same names and shapes, same logits."""
    _install(monkeypatch)
    c = load_config(CFG)
    torch_model = build_model(c.model, seed=0)
    kernels.select(cfg(), "cuda:0").install()
    fused_model = build_model(c.model, seed=0)
    layers.set_norm_classes(None, None)
    a, b = torch_model.state_dict(), fused_model.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)  # init recognises the fused norms as norms
    assert any(type(m) in (FusedLayerNorm, FusedRMSNorm) for m in fused_model.modules())
    tokens = torch.randint(0, c.model.vocab_size, (2, 32))
    torch.testing.assert_close(torch_model(tokens), fused_model(tokens))


def test_engine_optimizer_groups_and_fused_numerics(monkeypatch):
    """build_optimizer: two AdamW groups; torch's fused AdamW (CPU kernel here) matches the default
    implementation to bf16 tolerance over a few steps."""
    _no_apex(monkeypatch)
    c = load_config(CFG)
    model = build_model(c.model, seed=0)
    opt = build_optimizer(c, model)
    assert type(opt) is torch.optim.AdamW and [g["weight_decay"] for g in opt.param_groups] == [
        c.optimizer.weight_decay, 0.0]
    torch.manual_seed(0)
    p_ref, p_fused = (nn.Parameter(torch.randn(64, 64)) for _ in range(2))
    p_fused.data.copy_(p_ref.data)
    ref = torch.optim.AdamW([p_ref], lr=1e-2)
    fused = torch.optim.AdamW([p_fused], lr=1e-2, fused=True)
    for _ in range(5):
        g = torch.randn(64, 64)
        p_ref.grad, p_fused.grad = g.clone(), g.clone()
        ref.step(), fused.step()
    torch.testing.assert_close(p_fused, p_ref, rtol=1.6e-2, atol=1e-3)

"""Fused kernels: NVIDIA apex's when it is there (optional, never required), torch's otherwise.

    choice = select(cfg, device)        # training.fused_kernels: auto | apex | torch
    print(choice.describe())            # once, at start-up
    choice.install()                    # before the model is built: make_norm makes these norms
    opt = choice.optimizer(groups, lr=..., betas=..., eps=...)   # megams.training.engine.build_engine

NVIDIA apex is detected by its API (`apex.normalization.FusedLayerNorm` / `FusedRMSNorm`,
`apex.optimizers.FusedAdam`), never by `import apex` succeeding: the package called "apex" on PyPI is
an unrelated web toolkit, and a module of that name without the API is ignored (auto) or refused
(apex) with a message saying so. apex's kernels are CUDA kernels: on CPU `auto` picks torch.
Torch's choice: `torch.nn.LayerNorm` / `RMSNorm` and AdamW, `fused=True` on CUDA (one kernel for all
parameters' updates), the default (foreach) implementation on CPU.
Numerics: the fused norms and optimizers compute the same function; they agree with torch's to
bf16 rounding (tests/gpu/test_gpu.py compares them where a GPU and apex are present).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from megams.config.loader import ConfigError
from megams.models import layers


@dataclass(frozen=True)
class Apex:
    FusedLayerNorm: type
    FusedRMSNorm: type
    FusedAdam: type
    where: str


def find_apex() -> Tuple[Optional[Apex], str]:
    """NVIDIA apex's fused norms and Adam, or None and why not."""
    try:
        apex = importlib.import_module("apex")
    except Exception as e:  # ImportError, or a broken install raising anything at import
        return None, f"NVIDIA apex is not importable ({type(e).__name__}: {e})"
    where = getattr(apex, "__file__", None) or "?"
    found, missing = {}, []
    for mod, name in (("apex.normalization", "FusedLayerNorm"), ("apex.normalization", "FusedRMSNorm"),
                      ("apex.optimizers", "FusedAdam")):
        try:
            obj = getattr(importlib.import_module(mod), name, None)
        except Exception:
            obj = None
        if isinstance(obj, type):
            found[name] = obj
        else:
            missing.append(f"{mod}.{name}")
    if missing:
        return None, (f"the module 'apex' at {where} is not NVIDIA apex (no {', '.join(missing)}; the PyPI "
                      f"package 'apex' is an unrelated one): ignored")
    return Apex(where=where, **found), f"NVIDIA apex at {where}"


@dataclass(frozen=True)
class KernelChoice:
    requested: str                    # training.fused_kernels
    device: str
    apex: Optional[Apex]              # None: torch's kernels
    reason: str

    @property
    def uses_apex(self) -> bool:
        return self.apex is not None

    @property
    def norm_name(self) -> str:
        return "apex FusedLayerNorm/FusedRMSNorm" if self.uses_apex else "torch LayerNorm/RMSNorm"

    @property
    def optimizer_name(self) -> str:
        if self.uses_apex:
            return "apex FusedAdam (adam_w_mode)"
        return "torch AdamW (fused)" if self._cuda else "torch AdamW"

    @property
    def _cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    def describe(self) -> str:
        return (f"[megams] kernels (training.fused_kernels={self.requested}): norms {self.norm_name}, optimizer "
                f"{self.optimizer_name}; {self.reason}")

    def install(self) -> None:
        """Make `megams.models.layers.make_norm` build this choice's norms (torch's: the default)."""
        if self.uses_apex:
            layers.set_norm_classes(self.apex.FusedLayerNorm, self.apex.FusedRMSNorm)
        else:
            layers.set_norm_classes(None, None)

    def optimizer(self, params, lr: float, betas, eps: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
        if self.uses_apex:
            return self.apex.FusedAdam(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                       adam_w_mode=True)
        kw = {"fused": True} if self._cuda else {}
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **kw)


def select(cfg, device) -> KernelChoice:
    """The kernels for `cfg.training.fused_kernels` on `device` (ConfigError when `apex` cannot be had)."""
    requested = cfg.training.fused_kernels
    device = str(device)
    cuda = torch.device(device).type == "cuda"
    if requested == "torch":
        return KernelChoice(requested, device, None, "apex not asked for")
    apex, why = find_apex()
    if requested == "apex":
        if apex is None:
            raise ConfigError(f"training.fused_kernels=apex: {why}; install NVIDIA apex "
                              f"(github.com/NVIDIA/apex, built with --cpp_ext --cuda_ext) or use auto/torch")
        if not cuda:
            raise ConfigError(f"training.fused_kernels=apex: apex's fused kernels need CUDA, the device is {device}; "
                              f"use auto or torch")
        return KernelChoice(requested, device, apex, why)
    if apex is not None and cuda:
        return KernelChoice(requested, device, apex, why)
    if apex is not None:
        why = f"{why}, but the device is {device} (apex's kernels are CUDA kernels)"
    return KernelChoice(requested, device, None, why)

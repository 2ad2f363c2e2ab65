"""DeepSpeed engine set-up from the typed config (torch AdamW, warmup+cosine, ZeRO stage, precision)."""
from __future__ import annotations

import torch

from megams.config import Config, ConfigError
from megams.parallel.layers import param_shape
from megams.training.schedule import lr_multiplier


def precision_mode(cfg: Config, device: str) -> str:
    """How `training.precision` is realised:
    fp32; bf16 with ZeRO >= 1 -> DeepSpeed bf16 (bf16 weights, fp32 master copy in the optimizer);
    bf16 with ZeRO-0 -> torch.autocast(bf16) over fp32 weights (DeepSpeed's ZeRO-0 bf16 would be
    pure bf16 without master weights); fp16 -> DeepSpeed fp16 with dynamic loss scaling (GPU only)."""
    p = cfg.training.precision
    if p == "fp16" and not device.startswith("cuda"):
        raise ConfigError("training.precision=fp16 needs a CUDA GPU (DeepSpeed refuses fp16 on CPU); "
                          "use training.precision=bf16 or fp32")
    if p == "bf16":
        return "ds_bf16" if cfg.parallel.zero_stage >= 1 else "autocast_bf16"
    return p


def deepspeed_config(cfg: Config, dp_size: int, mode: str) -> dict:
    t, o = cfg.training, cfg.optimizer
    gas = cfg.grad_accum_steps(dp_size)
    ds = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": mode == "ds_bf16"},
        "fp16": {"enabled": mode == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if cfg.logging.comm_timing:  # read per step by megams.training.comm_timing
        ds["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False, "debug": False}
    if cfg.parallel.pipeline > 1:
        from megams.parallel.pipeline import deepspeed_pipeline_config
        ds["pipeline"] = deepspeed_pipeline_config(cfg)
    return ds


def param_groups(model: torch.nn.Module, weight_decay: float):
    """Decay matrices (linear / embedding weights); not norms, biases or scale embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if len(param_shape(p)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: Config, model: torch.nn.Module, kernels=None) -> torch.optim.Optimizer:
    """AdamW over `param_groups`: `kernels` (megams.training.kernels.KernelChoice) picks apex's FusedAdam
    or torch's AdamW (fused on CUDA); None: select from training.fused_kernels for the model's device."""
    if kernels is None:
        from megams.training.kernels import select
        p = next(model.parameters(), None)
        kernels = select(cfg, p.device if p is not None else "cpu")
    o = cfg.optimizer
    groups = param_groups(model, o.weight_decay)
    return kernels.optimizer(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def build_engine(cfg: Config, model: torch.nn.Module, dp_size: int, mode: str, mpu=None, guard=None, kernels=None):
    """`guard`: a megams.training.nonfinite.NonFiniteGuard put on the torch optimizer (skips NaN/inf steps);
    `kernels`: the start-up's megams.training.kernels.select(cfg, device) (None: selected here)."""
    import deepspeed
    o = cfg.optimizer
    opt = build_optimizer(cfg, model, kernels)
    warm, total, floor = cfg.warmup_steps(), cfg.training.max_steps, o.min_lr_ratio
    if guard is not None:  # before the scheduler, which wraps optimizer.step itself
        guard.attach(opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, warm, total, floor))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, mpu=mpu,
        config=deepspeed_config(cfg, dp_size, mode), dist_init_required=False)
    return engine, optimizer, scheduler

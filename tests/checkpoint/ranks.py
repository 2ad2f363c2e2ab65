"""Cases that run inside `run_ranks` processes for the checkpoint tests (module-level functions)."""
from __future__ import annotations

import json
import os


def _forget_previous_engine():
    """Several runs share these processes, and DeepSpeed keeps the last engine's `mpu` in a global
    (deepspeed.utils.groups.mpu): a data-parallel-only engine (mpu=None) would then read another
    run's tensor/pipeline layout. Reset it before each run."""
    from deepspeed.utils import groups
    groups.mpu = None


def train(rank, world, argv):
    from megams.training.trainer import main
    _forget_previous_engine()
    return main(argv)


def training_logits(rank, world, ckpt_dir, tokens):
    """Logits of the TRAINING model: the run's own layout rebuilt as the trainer builds it and
    restored by DeepSpeed's load_checkpoint (independent of megams.checkpoint's reader), gathered
    over the tensor ranks (vocabulary padding cropped). Returned by every rank (None off the last
    pipeline stage)."""
    import torch
    import torch.distributed as dist

    from megams.config.loader import config_from_dict
    from megams.training import checkpoint as ckpt
    from megams.training.engine import build_engine, precision_mode
    from megams.training.trainer import Trainer

    _forget_previous_engine()
    with open(os.path.join(ckpt_dir, "megams.json")) as f:
        cfg = config_from_dict(json.load(f)["config"])
    trainer = Trainer(cfg)
    layout = trainer._init_distributed()
    mode = precision_mode(cfg, "cpu")
    import inspect
    extra = (mode,) if len(inspect.signature(trainer._build_model).parameters) >= 2 else ()  # (layout, mode)
    model, loss_fn = trainer._build_model(layout, *extra)
    if layout.pp > 1:
        from megams.training.pipeline_step import PipelineTraining
        engine, _ = PipelineTraining(cfg, layout).build_engine(model, loss_fn, mode)
    else:
        engine, _, _ = build_engine(cfg, model, layout.dp, mode, mpu=getattr(layout.dims, "mpu", None))
    del model
    # with the optimizer: DeepSpeed loads a ZeRO-3 module alone through zero_to_fp32, which cannot read TP shards
    ckpt.load(engine, ckpt_dir)
    engine.eval()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast_bf16" else torch.no_grad()
    with torch.no_grad(), ctx:
        if layout.pp > 1:
            mb = cfg.training.micro_batch_size
            outs = []
            for i in range(0, tokens.shape[0], mb):  # eval_batch keeps only its last micro-batch's logits
                chunk = tokens[i:i + mb]
                outs.append(engine.eval_batch(iter([(chunk, chunk)]), return_logits=True, num_micro_batches=1)[1])
            if outs[0] is None:
                return None  # not the last stage
            logits = torch.cat(outs)
        else:
            logits = engine(tokens)
    if layout.tp > 1:
        parts = [torch.empty_like(logits) for _ in range(layout.tp)]
        dist.all_gather(parts, logits.contiguous(), group=layout.dims.tp_group)
        logits = torch.cat(parts, dim=-1)
    return logits[..., :cfg.model.vocab_size].float()

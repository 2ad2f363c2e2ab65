"""Training and evaluation steps when `parallel.pipeline > 1` (the trainer's pipeline strategy).

    pipe = PipelineTraining(cfg, layout)
    engine, scheduler = pipe.build_engine(model, loss_fn, mode)   # model: plain, after apply_tp / apply_ac
    loss = pipe.train_step(engine, train.next(), autocast)   # one optimizer step, 1F1B
    val_loss = pipe.evaluate(engine, eval_batches, autocast)

The step consumes the same layout-independent micro-batches as the non-pipeline loop
(`GlobalBatches.micro_batches(step)`: this data rank's micro-batches; the engine's gradient
accumulation steps = their number) through `engine.train_batch`, which runs DeepSpeed's 1F1B
schedule: the first stage reads the inputs, the last the targets and computes the loss; the
mean loss over the step's micro-batches and data ranks comes back on every stage.

One correction to DeepSpeed: with ZeRO-0 in fp32 (or bf16 autocast) its gradient clipping calls
`clip_grad_norm_` with the pipeline grid as mpu, which counts a replicated (not tensor-parallel)
parameter only on the first rank of the whole model-parallel group — the parameters of every
later stage drop out of the norm, so clipping scales by the wrong factor. `_clip_pipeline_grads`
replaces it on the engine: every stage counts its own parameters (tied copies once, replicated
ones on tensor rank 0) and the sum goes over the stage x tensor group. ZeRO-1 and DeepSpeed's
bf16 optimizer compute the norm correctly themselves.
"""
from __future__ import annotations

import math
import time
import types
from collections import defaultdict
from contextlib import nullcontext
from typing import Dict, List, Optional

import torch

from megams.distributed import comm


def pipeline_grad_norm(params, grid) -> torch.Tensor:
    """L2 norm of the gradients of a pipelined, tensor-parallel model replica (collective over
    the replica's stage x tensor ranks; gradients already averaged over data ranks)."""
    params = [p for p in params if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float64, device=params[0].grad.device if params else "cpu")
    tp_rank = grid.get_slice_parallel_rank()
    for p in params:
        if getattr(p, "ds_pipe_replicated", False):  # a tied copy: counted on the stage that owns it
            continue
        sharded = getattr(p, "tensor_model_parallel", False) or getattr(p, "model_parallel", False)
        if sharded or tp_rank == 0:
            sq += p.grad.detach().double().pow(2).sum()
    group = grid.get_model_parallel_group()
    sq = comm.to_comm(sq, group)  # a CPU sum (a stage without gradients) onto the device NCCL reduces
    comm.all_reduce(sq, group=group)
    return sq.sqrt().float()


def _clip_pipeline_grads(engine) -> None:
    """Replacement for DeepSpeedEngine.clip_fp32_gradients on a pipeline engine (see module docstring)."""
    params = [p for p in engine.module.parameters() if p.grad is not None]
    norm = pipeline_grad_norm(params, engine.grid)
    coef = min(1.0, engine.gradient_clipping() / (float(norm) + 1e-6))
    for p in params:
        p.grad.mul_(coef)
    engine._global_grad_norm = float(norm)


class PipelineTraining:
    def __init__(self, cfg, layout):
        self.cfg, self.layout = cfg, layout
        self.micro_batches = cfg.grad_accum_steps(layout.dp)

    def build_engine(self, model, loss_fn, mode: str, guard=None):
        """The PipelineModule over `model`'s stages and DeepSpeed's PipelineEngine around it.
        Drop every other reference to `model` afterwards: non-local layers are then freed."""
        from megams.parallel.pipeline import build_pipeline
        from megams.training.engine import build_engine
        pipe = build_pipeline(model, self.layout.dims, self.cfg, loss_fn, micro_batches=self.micro_batches)
        engine, _, scheduler = build_engine(self.cfg, pipe, self.layout.dp, mode, mpu=None, guard=guard)
        if not engine.zero_optimization() and not engine.bfloat16_enabled():
            engine.clip_fp32_gradients = types.MethodType(_clip_pipeline_grads, engine)
        return engine, scheduler

    @staticmethod
    def _device_batches(batches, device):
        return [(x.to(device), y.to(device)) for x, y in batches]

    def train_step(self, engine, micro_batches, autocast=None, device="cpu") -> float:
        """One optimizer step over this data rank's micro-batches; the loss averaged over them and
        over the data ranks (the same value on every rank)."""
        batches = self._device_batches(micro_batches, device)
        if len(batches) != engine.gradient_accumulation_steps():
            raise ValueError(f"{len(batches)} micro-batches for a pipeline engine of "
                             f"{engine.gradient_accumulation_steps()} gradient accumulation steps")
        with autocast or nullcontext():
            loss = engine.train_batch(iter(batches))
        return float(loss)

    def evaluate(self, engine, batches, autocast=None, device="cpu") -> float:
        """Mean loss over evaluation batches (each this data rank's share of one global batch, cut
        into training-sized micro-batches: the engine's buffers have the training shapes)."""
        mb = self.cfg.training.micro_batch_size
        losses = []
        for inputs, targets in batches:
            chunks = self._device_batches(zip(inputs.split(mb), targets.split(mb)), device)
            if any(x.shape[0] != mb for x, _ in chunks):
                raise ValueError(f"evaluation batch of {inputs.shape[0]} is not a multiple of the micro-batch {mb}")
            with torch.no_grad(), autocast or nullcontext():
                loss = engine.eval_batch(iter(chunks), num_micro_batches=len(chunks))
            losses.append(float(loss))  # averaged over micro-batches and data ranks, on every stage
        return math.fsum(losses) / len(losses)


# --- measuring what each stage does (benchmarks) --------------------------------------------------
class StageTimer:
    """Wall time per pipeline instruction on this rank (CPU: compute is synchronous, so the time
    of ForwardPass / BackwardPass is compute; Recv* is mostly waiting for the neighbour).

        timer = StageTimer(engine); engine.train_batch(it); timer.steps[-1] -> {"ForwardPass": s, ..., "window": s}

    `window` is from the start of the step to the end of this rank's last forward / backward pass
    (the pipelined part, before the gradient reductions and the optimizer step); `start` and
    `last_compute_end` are the same two moments as `time.perf_counter()` values.
    """

    def __init__(self, engine):
        from deepspeed.runtime.pipe import schedule
        self.steps: List[Dict[str, float]] = []
        self._current: Optional[Dict[str, float]] = None
        self._t0 = 0.0
        timed = {}
        for cmd, fn in type(engine)._INSTRUCTION_MAP.items():
            timed[cmd] = self._wrap(cmd.__name__, fn)
        engine._INSTRUCTION_MAP = timed  # instance attribute: shadows the class's map in _exec_schedule
        self._backward = schedule.BackwardPass.__name__
        original = engine.train_batch

        def train_batch(*args, **kwargs):
            self._current = defaultdict(float)
            self._t0 = time.perf_counter()
            out = original(*args, **kwargs)
            self._current["total"] = time.perf_counter() - self._t0
            self._current["start"] = self._t0
            self.steps.append(dict(self._current))
            self._current = None
            return out

        engine.train_batch = train_batch

    def _wrap(self, name, fn):
        def run(engine, **kwargs):
            t = time.perf_counter()
            out = fn(engine, **kwargs)
            end = time.perf_counter()
            if self._current is not None:
                self._current[name] += end - t
                if name == self._backward or name == "ForwardPass":
                    self._current["window"] = end - self._t0
                    self._current["last_compute_end"] = end
            return out
        return run

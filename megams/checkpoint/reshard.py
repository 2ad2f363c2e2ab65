"""Starting a training run from a checkpoint of ANOTHER layout (`checkpoint.load_from`), and recording
the layout of this one. Called by the trainer with a live DeepSpeed engine.

    recorded = describe_layout(engine, cfg, layout, plain_names)   # collective; -> megams.json "parameters"
    step, data_state = start_from(engine, scheduler, cfg, layout, recorded, source, log)
    check_resume(meta, cfg, layout, ckpt)                          # before resuming a run in place

How `start_from` works: every rank reads the source (any dp / tp / pp / ZeRO stage / precision, or a
plain-torch directory) into full fp32 tensors by plain-model name (`reader.read_checkpoint`), cuts
its own piece of each parameter the way this run's layout needs it (tensor shard along the recorded
`partition_dim`, vocabulary padded, ZeRO partition), and writes it into the engine:
  - the module's weights (bf16 ones rounded from the fp32 value),
  - the fp32 master weights DeepSpeed keeps for ZeRO >= 1 / bf16 (exact, not re-rounded from bf16),
  - AdamW's exp_avg / exp_avg_sq and step, into the base optimizer's state for this rank's flat
    partition (ZeRO-1/2, bf16 optimizer, ZeRO-3) or per parameter (ZeRO-0),
  - the LR schedule position, the engine's step counters and the data position (step-based).
What is NOT carried across layouts: the RNG streams (they are per rank; dropout masks differ) and,
from a plain-torch directory, any optimizer / schedule / data state (it has none: training starts
at step 0 from its weights).
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Tuple

import torch

from megams.checkpoint.errors import CheckpointError
from megams.checkpoint.layout import gather_layout, plain_parameters, universal_checkpoint_info

# model fields that do not change the parameters: a run may start from weights trained with others
FREE_MODEL_FIELDS = {"dropout", "retina_chunk_size"}


def describe_layout(engine, cfg, layout, plain_names: Dict[int, str]) -> dict:
    """Collective. The "parameters" record of megams.json (see layout.py); also attaches DeepSpeed's
    `universal_checkpoint_info` to the module, which DeepSpeed then writes into its model-states files."""
    from megams.models import build_model
    plain = plain_parameters(build_model(cfg.model, device="meta"))
    for p in engine.module.parameters():  # pipeline stages name parameters their own way
        name = plain_names.get(id(p))
        if name is not None and not hasattr(p, "megams_name"):
            p.megams_name = name
    dims = layout.dims
    record = gather_layout(engine, plain, dims.pp_rank if dims else 0, dims.tp_rank if dims else 0, layout.dp_rank)
    try:
        from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_VERSION_VALUE as version
    except ImportError:  # pragma: no cover
        version = 0.2
    engine.module.universal_checkpoint_info = universal_checkpoint_info(record, cfg.model.vocab_size, version)
    return record


# --- reading the source ---------------------------------------------------------------------------
def _source_state(source: str):
    """(TrainingState or None, params, model config dict, description) of a training checkpoint or a
    plain-torch model directory."""
    from megams.checkpoint.pretrained import is_pretrained_dir, read_config, read_weights
    from megams.checkpoint.reader import read_checkpoint
    if os.path.isdir(source) and is_pretrained_dir(source):
        cfg = read_config(source)
        tensors, f = read_weights(source)
        return None, {n: t.float() for n, t in tensors.items()}, cfg.model_dump(mode="json"), f"plain-torch model {f}"
    from megams.checkpoint.reader import resolve_checkpoint
    from megams.training.checkpoint import verify
    ckpt = resolve_checkpoint(source)
    verify(ckpt)  # collective: each rank hashes its share of the files, then every rank reads them all
    state = read_checkpoint(ckpt, optimizer=True, checksums=False)  # sizes + pickle scan again, no re-hash
    lay = state.layout
    desc = (f"{state.path} (step {state.step}; layout dp={lay['dp']} tp={lay.get('tp', 1)} pp={lay.get('pp', 1)} "
            f"zero_stage={lay['zero_stage']} precision={lay['precision']})")
    return state, state.params, state.model_config, desc


def _model_difference(source_model: dict, cfg) -> str:
    """'' when the models have the same parameters, else the first differing fields, there vs here."""
    from megams.config import dump_config
    mine = dump_config(cfg)["model"]
    keys = sorted(set(mine) | set(source_model), key=lambda k: (k != "type", k))  # the type first
    diff = [k for k in keys if k not in FREE_MODEL_FIELDS and mine.get(k) != source_model.get(k)]
    return ", ".join(f"model.{k}={source_model.get(k)!r} there, {mine.get(k)!r} here" for k in diff[:4])


def _check_model(source_model: dict, cfg, source: str) -> None:
    shown = _model_difference(source_model, cfg)
    if shown:
        raise CheckpointError(f"checkpoint.load_from: {source}: a different model ({shown})")


# --- resuming in place ------------------------------------------------------------------------------
def _layout_fields(lay: dict) -> dict:
    """What decides which files DeepSpeed writes and how their tensors are split: resume needs these
    equal. The data-parallel size only matters when ZeRO partitions the optimizer over it; the precision
    only where DeepSpeed keeps other state for it (ZeRO >= 1 bf16 files, fp16 loss scaling)."""
    zero, precision = int(lay.get("zero_stage", 0)), lay.get("precision", "fp32")
    out = {"tp": int(lay.get("tp", 1)), "pp": int(lay.get("pp", 1)), "zero_stage": zero}
    if zero >= 1:
        out.update(dp=int(lay.get("dp", 1)), precision=precision)
    elif precision == "fp16":
        out["precision"] = precision
    return out


def check_resume(meta: dict, cfg, layout, ckpt: str) -> None:
    """Before DeepSpeed loads `ckpt` to resume this run in place (checkpoint.resume): the same model,
    and a layout whose files DeepSpeed reads as they are. Otherwise DeepSpeed fails deep inside (a
    missing file, a size mismatch) or loads the wrong thing: refuse, naming both, and point to
    checkpoint.load_from, which reshards. Raises CheckpointError; call it on every rank before loading."""
    shown = _model_difference(meta["config"]["model"], cfg)
    if shown:
        raise CheckpointError(f"checkpoint.resume: {ckpt}: a different model ({shown}): resume with the model it "
                              "was saved with, or use a new training.run_dir")
    saved = meta["layout"]
    here = {"dp": layout.dp, "tp": layout.tp, "pp": layout.pp, "zero_stage": cfg.parallel.zero_stage,
            "precision": cfg.training.precision}
    a, b = _layout_fields(saved), _layout_fields(here)
    keys = [k for k in ("dp", "tp", "pp", "zero_stage", "precision") if k in a or k in b]
    diff = [k for k in keys if saved.get(k, 1 if k in ("tp", "pp") else None) != here[k]]
    if diff:
        there = " ".join(f"{k}={saved.get(k)}" for k in diff)
        mine = " ".join(f"{k}={here[k]}" for k in diff)
        raise CheckpointError(f"checkpoint.resume: {ckpt}: saved with layout {there}, this run has {mine} (resuming "
                              f"in place needs the same layout): start a new training.run_dir with "
                              f"checkpoint.load_from={ckpt}, which reshards")


# --- this rank's piece of a full tensor --------------------------------------------------------------
def local_piece(full: torch.Tensor, local_shape: List[int], dim: Optional[int], tp_rank: int, tp: int) -> torch.Tensor:
    """The tensor-parallel shard of `full` this rank holds (padded along `dim`, e.g. the vocabulary)."""
    if dim is None:
        return full
    need = local_shape[dim] * tp
    if need > full.shape[dim]:
        pad = list(full.shape)
        pad[dim] = need - full.shape[dim]
        full = torch.cat([full, full.new_zeros(pad)], dim)
    return full.narrow(dim, local_shape[dim] * tp_rank, local_shape[dim])


def _zero3_slice(value: torch.Tensor, param, part_rank: int) -> torch.Tensor:
    """This data rank's ZeRO-3 partition of a parameter value (zero padded at the end)."""
    n = param.ds_tensor.ds_numel
    flat = value.reshape(-1)
    out = flat.new_zeros(n)
    take = max(0, min(n, flat.numel() - part_rank * n))
    out[:take] = flat[part_rank * n:part_rank * n + take]
    return out


class _Writer:
    """Writes values (this rank's tensor-parallel piece, full over ZeRO) into one DeepSpeed engine."""

    def __init__(self, engine, adam_step: int):
        import torch.distributed as dist
        self.engine, self.opt = engine, engine.optimizer
        self.zero3 = hasattr(self.opt, "fp32_partitioned_groups_flat")
        self.base = getattr(self.opt, "optimizer", None) if (self.zero3 or self._zero12) else self.opt
        self.step = torch.tensor(float(adam_step))
        self.dp_rank = dist.get_rank(group=self.opt.dp_process_group) if self.zero3 else 0

    @property
    def _zero12(self) -> bool:
        return any(hasattr(p, "_hp_mapping") for p in self.engine.module.parameters())

    def _state(self, flat: torch.Tensor) -> dict:
        st = self.base.state[flat]
        if not st:
            st.update(step=self.step.clone(), exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat))
        return st

    def weights(self, p, value: torch.Tensor) -> None:
        with torch.no_grad():
            if self.zero3:
                part = _zero3_slice(value, p, self.dp_rank)
                p.ds_tensor.data.copy_(part.to(p.ds_tensor.dtype))
                g, off, _ = self.opt.grad_position[self.opt.get_param_id(p)]
                self.opt.fp32_partitioned_groups_flat[g].data.narrow(0, off, part.numel()).copy_(part)
                return
            p.data.copy_(value.to(p.dtype))
            m = getattr(p, "_hp_mapping", None)
            if m is not None:
                lp = m.lp_fragment_address
                m.hp_fragment.data.copy_(value.reshape(-1).narrow(0, lp.start, lp.numel))

    def moments(self, p, moments: Dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            if self.zero3:
                g, off, _ = self.opt.grad_position[self.opt.get_param_id(p)]
                st = self._state(self.opt.fp32_partitioned_groups_flat[g])
                for key, value in moments.items():
                    part = _zero3_slice(value, p, self.dp_rank)
                    st[key].narrow(0, off, part.numel()).copy_(part)
            elif hasattr(p, "_hp_mapping"):
                m = p._hp_mapping
                if m is None:
                    return  # no element of this parameter lives in this rank's partition
                flat = self.base.param_groups[m.param_group_index]["params"][0]
                hp, lp = m.hp_fragment_address, m.lp_fragment_address
                st = self._state(flat)
                for key, value in moments.items():
                    st[key].narrow(0, hp.start, hp.numel).copy_(value.reshape(-1).narrow(0, lp.start, lp.numel))
            else:  # ZeRO-0: torch AdamW's own per-parameter state
                self.base.state[p] = {"step": self.step.clone(),
                                      **{k: v.to(p.dtype).clone() for k, v in moments.items()}}


def _set_schedule(engine, scheduler, step: int, global_batch: int) -> None:
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    scheduler.last_epoch = step
    scheduler._last_lr = list(lrs)
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    engine.global_steps = step
    engine.global_samples = step * global_batch


def start_from(engine, scheduler, cfg, layout, record: dict, source: str,
               log: Callable[[str], None] = print) -> Tuple[int, Optional[dict]]:
    """Load `source` into this run's engine (see the module docstring). Returns (step, data state)."""
    if not os.path.exists(source):
        raise CheckpointError(f"checkpoint.load_from: {source}: no such directory (expected a training run or "
                              "checkpoint directory, or a model directory written by tools/convert_checkpoint.py)")
    try:
        state, params, source_model, desc = _source_state(source)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint.load_from: {e}") from None
    _check_model(source_model, cfg, source)
    dims = layout.dims
    tp_rank, tp = (dims.tp_rank, dims.tp_size) if dims else (0, 1)
    pp_rank = dims.pp_rank if dims else 0
    mine = next(r for r in record["mp_ranks"] if r["pp"] == pp_rank and r["tp"] == tp_rank)
    tied = record["tied"]
    carry_opt = state is not None and state.optimizer is not None
    step = state.step if state is not None else 0
    writer = _Writer(engine, state.adam_step if carry_opt and state.adam_step is not None else step)
    by_name = dict(engine.module.named_parameters())
    for name, plain, shape, dim, _ in mine["params"]:
        plain = tied.get(plain, plain)
        if plain not in params:
            raise CheckpointError(f"checkpoint.load_from: {source}: has no parameter {plain}")
        p = by_name[name]
        writer.weights(p, local_piece(params[plain], shape, dim, tp_rank, tp))
        if carry_opt:
            writer.moments(p, {k: local_piece(v, shape, dim, tp_rank, tp) for k, v in state.optimizer[plain].items()})
    data_state = None
    if state is not None:
        _set_schedule(engine, scheduler, step, cfg.training.global_batch_size)
        same_data = state.meta["config"]["data"] == cfg.data.model_dump(mode="json") and \
            state.meta["config"]["training"]["seed"] == cfg.training.seed
        data_state = state.meta.get("data") if same_data else None
    here = (f"dp={layout.dp} tp={layout.tp} pp={layout.pp} zero_stage={cfg.parallel.zero_stage} "
            f"precision={cfg.training.precision}")
    if state is None:
        log(f"[megams] checkpoint.load_from: weights of {desc} -> layout {here}; optimizer state, LR schedule and "
            "data position start fresh at step 0 (a plain-torch directory holds no training state)")
    else:
        log(f"[megams] checkpoint.load_from: {desc} -> layout {here}: fp32 weights"
            + (f" and AdamW state (exp_avg, exp_avg_sq, step {writer.step.item():.0f})" if carry_opt else
               " (no optimizer state in the source: AdamW starts fresh)")
            + f" carried; LR schedule continues at step {step}; data position "
            + ("continues" if data_state is not None else "restarts in the sample order of this run's data config")
            + "; RNG streams not carried (per rank, another layout)")
    return step, data_state

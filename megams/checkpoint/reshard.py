"""Starting a training run from a checkpoint of ANOTHER layout (`checkpoint.load_from`), and recording
the layout of this one. Called by the trainer with a live DeepSpeed engine.

    recorded = describe_layout(engine, cfg, layout, plain_names)   # collective; -> megams.json "parameters"
    step, data_state = start_from(engine, scheduler, cfg, layout, recorded, source, log)
    check_resume(meta, cfg, layout, ckpt)                          # before resuming a run in place

How `start_from` works: every rank opens the source (any dp / tp / pp / ZeRO stage / precision, or a
plain-torch directory) lazily (`sharded.py`) and reads, tensor by tensor, only its own piece of each
parameter the way this run's layout needs it (tensor shard along the recorded `partition_dim`,
vocabulary padded; then its ZeRO partition), from only the source shards and flat ranges that hold
it, and writes it into the engine (through DeepSpeed's public API where there is one, see _Writer):
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
def _open_source(source: str):
    """(lazy Source, its model config dict, description) of a training checkpoint or a plain-torch model
    directory. Nothing but metadata is read here: each rank later reads only its own pieces."""
    from megams.checkpoint.pretrained import is_pretrained_dir, read_config
    from megams.checkpoint.sharded import CheckpointSource, PretrainedSource
    if os.path.isdir(source) and is_pretrained_dir(source):
        cfg = read_config(source)
        src = PretrainedSource(source)
        return src, cfg.model_dump(mode="json"), f"plain-torch model {src.path}"
    from megams.checkpoint.reader import parameter_record, resolve_checkpoint
    from megams.training.checkpoint import verify
    ckpt = resolve_checkpoint(source)
    meta = verify(ckpt)  # collective: each rank hashes its share of the files (sizes, sha256, pickle scan)
    try:
        record = parameter_record(meta)
    except CheckpointError as e:
        raise CheckpointError(f"{os.path.join(ckpt, 'megams.json')}: {e}") from None
    src = CheckpointSource(ckpt, meta, record)
    lay = meta["layout"]
    desc = (f"{ckpt} (step {meta['step']}; layout dp={lay['dp']} tp={lay.get('tp', 1)} pp={lay.get('pp', 1)} "
            f"zero_stage={lay['zero_stage']} precision={lay['precision']})")
    return src, meta["config"]["model"], desc


def _model_difference(source_model: dict, cfg, absent_ok: bool = False) -> str:
    """'' when the models have the same parameters, else the first differing fields, there vs here.
    `absent_ok`: a field the source's config does not have at all (written before the field existed) is
    no difference by itself; the parameter check then names what is missing, if anything."""
    from megams.config import dump_config
    mine = dump_config(cfg)["model"]
    keys = sorted(set(mine) | set(source_model), key=lambda k: (k != "type", k))  # the type first
    diff = [k for k in keys if k not in FREE_MODEL_FIELDS and mine.get(k) != source_model.get(k)
            and not (absent_ok and k not in source_model)]
    return ", ".join(f"model.{k}={source_model.get(k)!r} there, {mine.get(k)!r} here" for k in diff[:4])


def _check_model(source_model: dict, cfg, source: str) -> None:
    shown = _model_difference(source_model, cfg, absent_ok=True)
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


def read_piece(src, plain: str, kind: str, local_shape: List[int], dim: Optional[int], tp_rank: int) -> torch.Tensor:
    """This rank's tensor-parallel piece of `plain`, read from `src` alone (megams.checkpoint.sharded):
    rows [tp_rank * local, (tp_rank + 1) * local) along `dim`, zeros past the plain size (padding)."""
    if dim is None:
        return src.read(plain, kind)
    return src.read(plain, kind, dim=dim, start=local_shape[dim] * tp_rank, length=local_shape[dim])


def _zero3_slice(value: torch.Tensor, n: int, part_rank: int) -> torch.Tensor:
    """This data rank's ZeRO-3 partition (`n` elements) of a parameter value (zero padded at the end)."""
    flat = value.reshape(-1)
    out = flat.new_zeros(n)
    take = max(0, min(n, flat.numel() - part_rank * n))
    out[:take] = flat[part_rank * n:part_rank * n + take]
    return out


def _step_tensor(step: float, group: dict, device) -> torch.Tensor:
    """AdamW's `step` as torch keeps it: a CPU scalar, on the parameter's device when fused/capturable."""
    on_device = bool(group.get("fused")) or bool(group.get("capturable"))
    return torch.tensor(float(step), dtype=torch.float32, device=device if on_device else "cpu")


def _adam_state(st: dict, like: torch.Tensor, step: float, group: dict) -> dict:
    if not st:
        st.update(step=_step_tensor(step, group, like.device), exp_avg=torch.zeros_like(like),
                  exp_avg_sq=torch.zeros_like(like))
    else:
        st["step"] = _step_tensor(step, group, st["step"].device if torch.is_tensor(st.get("step")) else like.device)
    return st


class _Writer:
    """Writes this rank's values (its tensor-parallel piece, full over ZeRO) into one DeepSpeed engine.

    Through DeepSpeed's public API where there is one: `deepspeed.utils.safe_set_full_fp32_param` /
    `safe_set_full_optimizer_state` (ZeRO-1/2, bf16 optimizer), `safe_set_local_fp32_param` /
    `safe_set_local_optimizer_state` (ZeRO-3), `lazy_init_hp_params_optimizer_state` (links the moments).
    Where there is none, three private fields, pinned with the DeepSpeed version in
    tests/checkpoint/test_deepspeed_api.py: `optimizer.optimizer` (the torch AdamW a ZeRO / bf16
    optimizer wraps: its state must exist before the first step to receive moments),
    `optimizer.fp32_partitioned_groups_flat` (ZeRO-3's flat fp32 groups, keys of that state) and
    `param.ds_tensor` (ZeRO-3's partition of the module weight, bf16 or fp32). ZeRO-0 is torch's AdamW
    alone: weights and moments land on the parameter's device and dtype."""

    def __init__(self, engine, groups: List[List[str]], adam_step: float, dp_rank: int):
        self.engine, self.opt = engine, engine.optimizer
        self.zero3 = int(engine.zero_optimization_stage()) == 3
        # ZeRO-1/2 and DeepSpeed's bf16 optimizer wrap the torch optimizer (not a torch.optim.Optimizer)
        self.wrapped = self.zero3 or not isinstance(self.opt, torch.optim.Optimizer)
        self.base = self.opt.optimizer if self.wrapped else self.opt
        self.groups, self.step, self.dp_rank = groups, float(adam_step), dp_rank
        self._moments_ready = False

    def _prepare_moments(self) -> None:
        """AdamW state for every flat fp32 partition (DeepSpeed creates it lazily at the first step),
        linked to the parameters so the safe_set_* calls can write them."""
        if self._moments_ready or not self.wrapped:
            return
        from deepspeed.utils import lazy_init_hp_params_optimizer_state
        by_name = dict(self.engine.module.named_parameters())
        group_opts = self.base.param_groups
        if self.zero3:
            for g, flat in enumerate(self.opt.fp32_partitioned_groups_flat):
                _adam_state(self.base.state[flat], flat, self.step, group_opts[min(g, len(group_opts) - 1)])
        else:
            if len(group_opts) != len(self.groups):
                raise CheckpointError(f"checkpoint.load_from: the optimizer has {len(group_opts)} param groups, the "
                                      f"layout record {len(self.groups)}")
            for group, names in zip(group_opts, self.groups):
                flat = group["params"][0]
                _adam_state(self.base.state[flat], flat, self.step, group)
                lazy_init_hp_params_optimizer_state([by_name[n] for n in names], flat, self.base.state)
        self._moments_ready = True

    def weights(self, p, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param
        with torch.no_grad():
            if self.zero3:
                part = _zero3_slice(value, p.ds_tensor.ds_numel, self.dp_rank)
                p.ds_tensor.data.copy_(part.to(p.ds_tensor.dtype))
                safe_set_local_fp32_param(p, part)
                return
            p.data.copy_(value.to(p.dtype))
            if self.wrapped:
                safe_set_full_fp32_param(p, value.to(torch.float32))

    def moments(self, p, moments: Dict[str, torch.Tensor]) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state, safe_set_local_optimizer_state
        with torch.no_grad():
            if self.zero3:
                self._prepare_moments()
                for key, value in moments.items():
                    safe_set_local_optimizer_state(p, _zero3_slice(value, p.ds_tensor.ds_numel, self.dp_rank), key)
            elif self.wrapped:
                self._prepare_moments()
                for key, value in moments.items():
                    safe_set_full_optimizer_state(p, value.to(torch.float32), key)
            else:  # ZeRO-0: torch AdamW's own per-parameter state, where the parameter is
                group = next((g for g in self.base.param_groups if any(q is p for q in g["params"])), {})
                self.base.state[p] = {"step": _step_tensor(self.step, group, p.device),
                                      **{k: v.to(device=p.device, dtype=p.dtype).clone() for k, v in moments.items()}}


def _set_schedule(engine, scheduler, step: int, global_batch: int) -> None:
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    scheduler.last_epoch = step
    scheduler._last_lr = list(lrs)
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    engine.global_steps = step
    engine.global_samples = step * global_batch


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


def start_from(engine, scheduler, cfg, layout, record: dict, source: str,
               log: Callable[[str], None] = print) -> Tuple[int, Optional[dict]]:
    """Load `source` into this run's engine (see the module docstring). Returns (step, data state).
    Reads only this rank's pieces (megams.checkpoint.sharded), one tensor at a time."""
    if not os.path.exists(source):
        raise CheckpointError(f"checkpoint.load_from: {source}: no such directory (expected a training run or "
                              "checkpoint directory, or a model directory written by tools/convert_checkpoint.py)")
    try:
        src, source_model, desc = _open_source(source)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint.load_from: {e}") from None
    _check_model(source_model, cfg, source)
    dims = layout.dims
    tp_rank = dims.tp_rank if dims else 0
    pp_rank = dims.pp_rank if dims else 0
    mine = next(r for r in record["mp_ranks"] if r["pp"] == pp_rank and r["tp"] == tp_rank)
    tied = record["tied"]
    wanted = [(name, tied.get(plain, plain), shape, dim) for name, plain, shape, dim, _ in mine["params"]]
    from megams.checkpoint.sharded import missing_parameter
    for _, plain, _, _ in wanted:  # before anything is written: an older checkpoint may lack a newer parameter
        if not src.has(plain):
            raise CheckpointError(f"checkpoint.load_from: {missing_parameter(src.path, plain)}")
    meta = getattr(src, "meta", None)
    step = int(meta["step"]) if meta is not None else 0
    writer = _Writer(engine, mine["groups"], step, layout.dp_rank)
    by_name = dict(engine.module.named_parameters())
    carry_opt = None
    try:
        for name, plain, shape, dim in wanted:
            p = by_name[name]
            writer.weights(p, read_piece(src, plain, "param", shape, dim, tp_rank))
            if carry_opt is None:  # asked once this rank's first file is open (it need open no other)
                carry_opt = meta is not None and src.optimizer
                adam_step = src.adam_step() if carry_opt else None
                writer.step = float(adam_step if adam_step is not None else step)
            if carry_opt:
                writer.moments(p, {k: read_piece(src, plain, k, shape, dim, tp_rank)
                                   for k in ("exp_avg", "exp_avg_sq")})
    except KeyError as e:
        raise CheckpointError(f"checkpoint.load_from: {src.path}: truncated or corrupted checkpoint shard (missing "
                              f"entry {e})") from None
    data_state = None
    if meta is not None:
        _set_schedule(engine, scheduler, step, cfg.training.global_batch_size)
        same_data = meta["config"]["data"] == cfg.data.model_dump(mode="json") and \
            meta["config"]["training"]["seed"] == cfg.training.seed
        data_state = meta.get("data") if same_data else None
    here = (f"dp={layout.dp} tp={layout.tp} pp={layout.pp} zero_stage={cfg.parallel.zero_stage} "
            f"precision={cfg.training.precision}")
    st = src.stats
    read = (f"; this rank read {_mib(st.read)} from {len(st.files)} of the source's files for its "
            f"{_mib(st.returned)} share (largest scratch buffer {_mib(st.peak_transient)})")
    if meta is None:
        log(f"[megams] checkpoint.load_from: weights of {desc} -> layout {here}; optimizer state, LR schedule and "
            "data position start fresh at step 0 (a plain-torch directory holds no training state)" + read)
    else:
        log(f"[megams] checkpoint.load_from: {desc} -> layout {here}: fp32 weights"
            + (f" and AdamW state (exp_avg, exp_avg_sq, step {writer.step:.0f})" if carry_opt else
               " (no optimizer state in the source: AdamW starts fresh)")
            + f" carried; LR schedule continues at step {step}; data position "
            + ("continues" if data_state is not None else "restarts in the sample order of this run's data config")
            + "; RNG streams not carried (per rank, another layout)" + read)
    return step, data_state

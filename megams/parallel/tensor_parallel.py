"""`apply_tp(model, dims, cfg) -> (model, loss_fn)`: tensor (and sequence) parallelism for the plain
models of megams.models, applied from outside, torchtitan style.

The plain model is built identically on every rank; `apply_tp` then keeps each rank's shard. Its
leaves are swapped for the layers of `megams.parallel.layers`, and the composite modules keep
their class, parameter names and forward code: each gets a wrapper around its forward that adds
the communication its plan needs (`_wrap_forward`). Plans, by module:

    attention (Attention, RetinaAttention)  heads split: wq/wk/wv column, wo row. The input enters
        the tensor-parallel region once (copy_to_tp, or gather_from_sp) and leaves once (all-reduce,
        or reduce-scatter); retina pools its keys/values from the entered input, per head shard.
    MLP (gelu, swiglu)                      fc_in | w_gate, w_up column -> fc_out | w_down row.
    Shorten   linear: proj row-parallel on the split group features; attention: its attention and
              MLP as above; avg: nothing to split.
    Upsample  linear: proj column-parallel, output gathered; attention: its attention as above.
    Aggregation  attention: its attention as above (per position: rows B*T are independent).
    embed / head  vocab-parallel embedding; the tied head reuses its shard (never gathers logits);
              `loss_fn` is the vocab-parallel cross-entropy over the real vocabulary.

Sequence parallelism (`parallel.sequence_parallel`): every tensor passed between the modules of
a model body is split along the sequence ("SP region"). Norms, dropout and residual adds run on
1/tp of the positions; attention and MLP all-gather the sequence when entering the tensor region
and reduce-scatter it when leaving. Per position modules stay local: repeat upsampling and sum
aggregation need no communication; attention aggregation gathers its rows (dim 0 of its
[B*T, scales, d] view). Shorten and linear upsampling mix positions across the split, so they
gather their input, run tensor-parallel on the whole sequence, and keep their part of the output.
Replicated parameters used in the SP region (norms, scale embeddings) see only this rank's
positions: their gradients are summed over the tensor ranks, in one flat all-reduce per module call
(`_Plan.sum_grads_over_tp`; a hook per parameter under ZeRO-3). The input is padded on the
right to a multiple of K_S * tp (exact by causality) so every scale splits evenly.

Dropout: replicated activations draw from the default generator (the same on the tensor ranks of
a replica, see megams.parallel.random); split ones (attention probabilities of this rank's heads,
and every dropout in the SP region) from the tracker's model-parallel stream.

`full_state_dict(model)` / `full_grads(model)` gather the plain model's tensors back (padded
vocabulary rows dropped; collective over the tensor group); `parameter_count(model)` counts them
without communicating.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from megams.models.base import LanguageModel
from megams.models.embedding import check_length
from megams.models.layers import MLP, Block
from megams.models.scales import Aggregation, Shorten, Upsample
from megams.parallel.cross_entropy import vocab_parallel_cross_entropy
from megams.parallel.dims import ParallelDims
from megams.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, param_shape
from megams.parallel.mappings import (all_gather, all_reduce, copy_to_tp, gather_from_sp, reduce_from_tp,
                                      reduce_scatter_to_sp, scatter_to_sp)
from megams.parallel.random import get_rng_tracker

SEQ_DIM = 1  # megams activations are [B, T, d]


def apply_tp(model: LanguageModel, dims: ParallelDims, cfg) -> Tuple[LanguageModel, Callable]:
    """Shard `model` (a plain megams model, the same on every rank) over `dims`' tensor group.

    Returns the model (changed in place: forward gives this rank's vocabulary part of the logits,
    [B, T, V_padded/tp]) and `loss_fn(logits, targets)`: the mean next-token cross-entropy.
    """
    dims.check_model(cfg.model)
    plan = _Plan(dims, sequence_parallel=bool(cfg.parallel.sequence_parallel) and dims.tp_size > 1,
                 zero3=cfg.parallel.zero_stage == 3)
    for module in list(model.modules()):
        for kind, apply in ((Block, plan.block), (Shorten, plan.shorten), (Upsample, plan.upsample),
                            (Aggregation, plan.aggregation)):
            if isinstance(module, kind):
                apply(module)
    plan.language_model(model)
    left = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if left:
        raise NotImplementedError(f"apply_tp has no tensor-parallel plan for {left}")
    return model, functools.partial(vocab_parallel_loss, dims=dims, vocab_size=cfg.model.vocab_size)


def vocab_parallel_loss(logits: torch.Tensor, targets: torch.Tensor, dims: ParallelDims,
                        vocab_size: int) -> torch.Tensor:
    """Mean cross-entropy over the tokens of a micro-batch, from this rank's vocabulary shard."""
    return vocab_parallel_cross_entropy(logits, targets, dims, vocab_size=vocab_size).mean()


# the plans --------------------------------------------------------------------------------------------
def _wrap_forward(module: nn.Module, around: Callable, *args) -> None:
    """Make `module(...)` run `around(module, *args, plain_forward, ...)`: the module keeps its class,
    its parameter names and its own forward code, which the wrapper calls."""
    module.forward = functools.partial(around, module, *args, module.forward)


class _Plan:
    def __init__(self, dims: ParallelDims, sequence_parallel: bool, zero3: bool = False):
        self.dims, self.group, self.sp, self.zero3 = dims, dims.tp_group, sequence_parallel, zero3

    # leaves -------------------------------------------------------------------------------------
    def column(self, linear: nn.Linear, **kw) -> ColumnParallelLinear:
        return ColumnParallelLinear.from_full(linear, self.dims, **kw)

    def row(self, linear: nn.Linear, **kw) -> RowParallelLinear:
        return RowParallelLinear.from_full(linear, self.dims, **kw)

    def sum_grads_over_tp(self, module: nn.Module, *owners: nn.Module, own: Tuple[str, ...] = ()) -> None:
        """Replicated parameters used in the SP region (every parameter of `owners`, submodules of
        `module`, and `module`'s own parameters named in `own`) get a partial gradient on every rank:
        summed over the tensor ranks in ONE flat all-reduce per `module` call (`_sp_bucket_forward`),
        not one per parameter. Under ZeRO-3 (parameters partitioned, gathered by DeepSpeed's own
        hooks) a hook per parameter does it."""
        where = {id(m): k for k, m in module.named_modules()}
        names = list(own) + [f"{where[id(o)]}.{n}" if where[id(o)] else n
                             for o in owners for n, _ in o.named_parameters()]
        named = [(n, module.get_parameter(n)) for n in names]
        named = [(n, p) for n, p in named if not getattr(p, "sequence_parallel", False)]  # summed once
        if not named:
            return
        names, params = (list(t) for t in zip(*named))
        for p in params:
            p.sequence_parallel = True  # Megatron's mark
        if self.zero3:
            for p in params:
                p.register_hook(functools.partial(all_reduce, group=self.group))
            return
        _wrap_forward(module, _sp_bucket_forward, self.group, tuple(names))

    # attention and MLP: one entry into the tensor-parallel region, one exit ---------------------
    def heads(self, attn: nn.Module, sp: bool, seq_dim: int = SEQ_DIM) -> None:
        """Attention or RetinaAttention with its heads split over the tensor ranks."""
        for name in ("wq", "wk", "wv"):
            setattr(attn, name, self.column(getattr(attn, name), input_in_region=True))
        attn.wo = self.row(attn.wo, reduce_output=False)
        _wrap_forward(attn, _region_forward, self.group, sp, seq_dim)

    def mlp(self, mlp: MLP, sp: bool) -> None:
        ins, out = (("w_gate", "w_up"), "w_down") if mlp.kind == "swiglu" else (("fc_in",), "fc_out")
        for name in ins:
            setattr(mlp, name, self.column(getattr(mlp, name), input_in_region=True))
        setattr(mlp, out, self.row(getattr(mlp, out), reduce_output=False))
        _wrap_forward(mlp, _region_forward, self.group, sp, SEQ_DIM)

    # composite modules --------------------------------------------------------------------------
    def block(self, block: Block) -> None:
        self.heads(block.attn, self.sp)
        self.mlp(block.mlp, self.sp)
        if self.sp:
            self.sum_grads_over_tp(block, block.norm1, block.norm2)
            _wrap_forward(block.drop, _split_dropout)

    def shorten(self, shorten: Shorten) -> None:
        """Groups of k positions after a shift of k-1 cross the sequence split: run on the whole."""
        if shorten.kind == "linear":  # [B, m, k*d] @ [k*d, d]: rows split, so no all-gather forward
            shorten.proj = self.row(shorten.proj, input_is_parallel=False)
        elif shorten.kind == "attention":
            self.heads(shorten.attn, sp=False)
            self.mlp(shorten.mlp, sp=False)
        if self.sp:
            _wrap_forward(shorten, _whole_sequence_forward, self.group, 1)

    def upsample(self, up: Upsample) -> None:
        if up.kind == "linear":  # [B, m, d] @ [d, k*d]; the k*d outputs gathered
            up.proj = self.column(up.proj, gather_output=True)
            if self.sp:
                _wrap_forward(up, _whole_sequence_forward, self.group, 1)
        elif up.kind == "attention":
            self.heads(up.attn, self.sp)
            if self.sp:
                _wrap_forward(up, _sp_attention_upsample, self.dims.tp_size)
        # repeat: coarse position j -> fine j*k..j*k+k-1 keeps the sequence split aligned: local
        if self.sp:  # linear: whole sequence, replicated, so its merge needs no sum
            owners = [up.norm_q, up.norm_kv] if up.kind == "attention" else []
            if up.merge is not None and up.kind != "linear":  # per coarse position on this rank's shard
                owners.append(up.merge)
            self.sum_grads_over_tp(up, *owners)

    def aggregation(self, agg: Aggregation) -> None:
        if agg.kind == "attention":  # each position attends over its own scale vectors: rows split
            self.heads(agg.attn, self.sp, seq_dim=0)
            if self.sp:
                self.sum_grads_over_tp(agg, agg.norm, own=("scale_embed",))

    def language_model(self, model: LanguageModel) -> None:
        cfg, dims = model.cfg, self.dims
        tied = model.head.weight is model.embed.weight
        model.embed = VocabParallelEmbedding.from_full(model.embed, dims, sequence_parallel=self.sp)
        vocab = model.embed.padded_num_embeddings
        if tied:  # the head is the embedding's shard: this rank's vocabulary part of the logits
            head = ColumnParallelLinear(cfg.d_model, cfg.vocab_size, dims, bias=False, padded_out_features=vocab,
                                        sequence_parallel=self.sp, device="meta")
            head.weight = model.embed.weight
            model.head = head
        else:
            model.head = self.column(model.head, padded_out_features=vocab, sequence_parallel=self.sp)
        if self.sp:
            self.sum_grads_over_tp(model.norm_f, model.norm_f)
            _wrap_forward(model.drop, _split_dropout)
            _wrap_forward(model, _sp_language_model_forward, self)
            model.forward_hidden = functools.partial(_sp_forward_hidden, model, self)


# forwards ------------------------------------------------------------------------------------------------
def _region_forward(module, group, sp: bool, seq_dim: int, plain, x, *args, **kwargs):
    """Attention / MLP: enter the tensor-parallel region once (inputs and a `context`), run the
    module's own forward on this rank's heads / hidden units, leave once (sum of partial outputs)."""
    enter = functools.partial(gather_from_sp, group=group, seq_dim=seq_dim) if sp else \
        functools.partial(copy_to_tp, group=group)
    x = enter(x)
    args = tuple(enter(a) if isinstance(a, torch.Tensor) else a for a in args)
    if kwargs.get("context") is not None:
        kwargs["context"] = enter(kwargs["context"])
    if module.training and getattr(module, "dropout", 0.0) > 0:  # attention dropout on this rank's heads
        with get_rng_tracker().fork():
            y = plain(x, *args, **kwargs)
    else:
        y = plain(x, *args, **kwargs)
    return reduce_scatter_to_sp(y, group, seq_dim) if sp else reduce_from_tp(y, group)


class _SumGradsOverTP(torch.autograd.Function):
    """Identity on parameters forward; backward sums their gradients over the tensor ranks in one
    flat all-reduce (per dtype). Autograd runs it once every output's gradient is complete, i.e.
    after the last use of the parameters in the module's backward, and before their AccumulateGrad
    (so ZeRO / DDP gradient hooks see the summed gradient, as with a hook per parameter)."""

    @staticmethod
    def forward(ctx, group, *params):
        ctx.group = group
        return tuple(p.view_as(p) for p in params)

    @staticmethod
    def backward(ctx, *grads):
        out = list(grads)
        by_dtype: Dict[torch.dtype, list] = {}
        for i, g in enumerate(grads):
            if g is not None:
                by_dtype.setdefault(g.dtype, []).append(i)
        for idx in by_dtype.values():
            parts = [grads[i] for i in idx]
            flat = all_reduce(torch._utils._flatten_dense_tensors(parts), ctx.group)
            for i, g in zip(idx, torch._utils._unflatten_dense_tensors(flat, parts)):
                out[i] = g
        return (None, *out)


def _sp_bucket_forward(module: nn.Module, group, names: Tuple[str, ...], plain, *args, **kwargs):
    """Run `module` with its parameters `names` replaced, for this call, by identity views whose
    gradients are summed over the tensor ranks in one bucket (`_SumGradsOverTP`)."""
    if not torch.is_grad_enabled():
        return plain(*args, **kwargs)
    owners = []
    for n in names:
        path, _, attr = n.rpartition(".")
        owners.append((module.get_submodule(path) if path else module, attr))
    params = [o._parameters[a] for o, a in owners]
    views = _SumGradsOverTP.apply(group, *params)
    try:
        for (o, a), v in zip(owners, views):
            o._parameters[a] = v  # read as `o.a` by the module's own code; restored below
        return plain(*args, **kwargs)
    finally:
        for (o, a), p in zip(owners, params):
            o._parameters[a] = p


def _split_dropout(module: nn.Dropout, plain, x):
    """Dropout on this rank's part of the sequence: masks from the model-parallel stream."""
    if not module.training or module.p == 0:
        return plain(x)
    with get_rng_tracker().fork():
        return plain(x)


def _whole_sequence_forward(module, group, n_inputs: int, plain, *args):
    """SP: gather the first `n_inputs` inputs' sequence, run the module (tensor-parallel inside,
    replicated outside), keep this rank's part of the output."""
    args = [gather_from_sp(a, group, SEQ_DIM, tp_output_grad=False) if i < n_inputs else a
            for i, a in enumerate(args)]
    return scatter_to_sp(plain(*args), group, SEQ_DIM)


def _sp_attention_upsample(up: Upsample, tp: int, plain, coarse, fine):
    """`Upsample(attention)` on sequence shards: repeat is local; the attention gathers its queries
    (fine) and keys (coarse), and reduce-scatters back to this rank's fine positions."""
    k = up.k
    m = coarse.shape[1] * tp
    i = torch.arange(m * k, device=coarse.device)
    j = torch.arange(m, device=coarse.device)
    mask = j[None, :] * k <= i[:, None]
    return up.merged(coarse).repeat_interleave(k, dim=1) + up.attn(
        up.norm_q(fine), up.norm_kv(coarse), causal=False, mask=mask, q_pos=i, k_pos=j * k)


def _sp_hidden(model: LanguageModel, plan: _Plan, tokens: torch.Tensor) -> torch.Tensor:
    """tokens [B, T] -> this rank's part [B, T_pad/tp, d] of the final normed hidden states."""
    check_length(model.cfg, tokens.shape[1])
    multiple = model.cfg.total_shortening * plan.dims.tp_size
    pad = (-tokens.shape[1]) % multiple
    if pad:  # right padding is exact: causality keeps it out of every real position
        tokens = F.pad(tokens, (0, pad))
    x = model.embed(tokens)  # reduce-scattered along the sequence
    if model.pos_embed is not None:
        pos = torch.arange(tokens.shape[1], device=tokens.device).clamp(max=model.pos_embed.num_embeddings - 1)
        x = x + scatter_to_sp(model.pos_embed(pos)[None], plan.group, SEQ_DIM)
    x = model._hidden(model.drop(x))
    return model.norm_f(x)


def _sp_language_model_forward(model: LanguageModel, plan: _Plan, plain, tokens: torch.Tensor) -> torch.Tensor:
    logits = model.head(_sp_hidden(model, plan, tokens))  # the head gathers the sequence: [B, T_pad, V/tp]
    return logits[:, :tokens.shape[1]]


def _sp_forward_hidden(model: LanguageModel, plan: _Plan, tokens: torch.Tensor) -> torch.Tensor:
    h = gather_from_sp(_sp_hidden(model, plan, tokens), plan.group, SEQ_DIM, tp_output_grad=False)
    return h[:, :tokens.shape[1]]


# back to the plain model -----------------------------------------------------------------------------
def _split(module: nn.Module, name: str) -> Optional[Tuple[int, int]]:
    """(dim, full size) along which parameter `name` of `module` is split; None if replicated."""
    if isinstance(module, VocabParallelEmbedding) and name == "weight":
        return 0, module.num_embeddings
    if isinstance(module, ColumnParallelLinear):
        return 0, module.out_features
    if isinstance(module, RowParallelLinear) and name == "weight":
        return 1, module.in_features
    return None


def _full(module: nn.Module, name: str, t: torch.Tensor, dims: Optional[ParallelDims]) -> torch.Tensor:
    split = _split(module, name)
    with torch.no_grad():
        if split is None:
            return t.detach().clone()
        dim, size = split
        return all_gather(t.detach(), dim, dims.tp_group).narrow(dim, 0, size).clone()


def _dims_of(model: nn.Module) -> Optional[ParallelDims]:
    return next((m.dims for m in model.modules() if isinstance(m, VocabParallelEmbedding)), None)


def full_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The plain model's state dict (same keys, full shapes, no vocabulary padding), gathered from
    the shards. Collective: every tensor rank must call it."""
    dims, out = _dims_of(model), {}
    for mname, module in model.named_modules():
        prefix = f"{mname}." if mname else ""
        for name, p in module.named_parameters(recurse=False):
            out[prefix + name] = _full(module, name, p, dims)
        for name, b in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                out[prefix + name] = b.detach().clone()
    return out


def full_grads(model: nn.Module) -> Dict[str, Optional[torch.Tensor]]:
    """{plain parameter name: full gradient} (named_parameters' names: a tied weight once).
    Collective: every tensor rank must call it."""
    dims, out = _dims_of(model), {}
    names = {id(p): name for name, p in model.named_parameters()}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            key = names.get(id(p))
            if key is not None and key not in out:
                out[key] = None if p.grad is None else _full(module, name, p.grad, dims)
    return out


def parameter_count(model: nn.Module) -> int:
    """Parameters of the plain model (full shapes, padding excluded), counted without communication."""
    seen, total = set(), 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            split = _split(module, name)
            shape = param_shape(p)
            numel = math.prod(shape)
            total += numel if split is None else numel // shape[split[0]] * split[1]
    return total


__all__ = ["apply_tp", "vocab_parallel_loss", "full_state_dict", "full_grads", "parameter_count"]

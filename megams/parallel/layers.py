"""Tensor-parallel layers, made from the full plain-torch modules of megams.models.

    ColumnParallelLinear   weight [out/tp, in]: replicated input -> output split along the last dim
    RowParallelLinear      weight [out, in/tp]: input split along the last dim -> replicated output
    VocabParallelEmbedding weight [V_padded/tp, d]: each rank looks up the ids in its vocab range

A column layer followed by a row layer (attention: wq/wk/wv then wo; MLP: fc_in then fc_out)
communicates once forward (the row layer's all-reduce) and once backward (the column layer's).
With `sequence_parallel`, activations outside the pair are split along the sequence: the column
layer all-gathers its input and the row layer reduce-scatters its output, which moves the same
bytes as the all-reduce but keeps norms, dropout and residuals on 1/tp of the tokens.

`from_full(module, dims, ...)` keeps this rank's shard of a full module that is initialised
identically on every rank; `full_weight()` / `full_state_dict()` gather it back (collective: every
tensor rank must call it). Sharded parameters carry `tensor_model_parallel = True` and
`partition_dim`, which DeepSpeed reads to count them once per rank in gradient norms.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megams.parallel.dims import ParallelDims, padded_vocab
from megams.parallel.mappings import (all_gather, copy_to_tp, gather_from_sp, gather_from_tp, reduce_from_tp,
                                      reduce_scatter_to_sp, scatter_to_tp)


def _sharded(shape, dim: int, device, dtype) -> nn.Parameter:
    p = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))
    p.tensor_model_parallel = True
    p.partition_dim = dim
    return p


def _shard_of(full: torch.Tensor, dims: ParallelDims, dim: int, padded: Optional[int] = None) -> torch.Tensor:
    """This tensor rank's part of `full` along `dim`, after padding `dim` with zeros to `padded`."""
    if padded is not None and padded > full.size(dim):
        pad = list(full.shape)
        pad[dim] = padded - full.size(dim)
        full = torch.cat([full, full.new_zeros(pad)], dim)
    return full.chunk(dims.tp_size, dim)[dims.tp_rank]


def _gather_full(shard: torch.Tensor, dims: ParallelDims, dim: int, size: int) -> torch.Tensor:
    with torch.no_grad():
        return all_gather(shard.detach(), dim, dims.tp_group).narrow(dim, 0, size).clone()


def _check_divisible(what: str, size: int, dims: ParallelDims) -> None:
    if size % dims.tp_size:
        raise ValueError(f"{what} {size} is not divisible by the tensor-parallel size {dims.tp_size}")


def column_parallel_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], group,
                           gather_output: bool = False, sequence_parallel: bool = False,
                           seq_dim: int = 1) -> torch.Tensor:
    """x @ weight.T + bias with `weight` this rank's rows of the full weight (also the tied LM head:
    the vocab-parallel embedding's weight gives this rank's part of the logits)."""
    x = gather_from_sp(x, group, seq_dim) if sequence_parallel else copy_to_tp(x, group)
    y = F.linear(x, weight, bias)
    return gather_from_tp(y, group) if gather_output else y


def param_shape(p: torch.Tensor) -> tuple:
    """This rank's shape of a parameter (its tensor-parallel shard), also once ZeRO-3 has partitioned it
    over the data ranks (its `.data` is then empty and DeepSpeed keeps the shape in `ds_shape`)."""
    return tuple(getattr(p, "ds_shape", p.shape))


class ColumnParallelLinear(nn.Module):
    """nn.Linear with the output features split over the tensor ranks.

    Input: replicated [..., in] (or this rank's part of the sequence with `sequence_parallel`).
    Output: this rank's [..., out/tp], or the whole [..., out] with `gather_output`.
    `padded_out_features` pads the output with zero rows so it splits (an untied LM head over a
    padded vocab); a gathered output is cropped back to `out_features`.
    `input_in_region`: the caller has already put the input into the tensor-parallel region
    (`copy_to_tp` / `gather_from_sp` once for several layers that read it, e.g. wq, wk, wv), so
    this layer communicates nothing on its input.
    Parameters start at zero: use `from_full`.
    """

    def __init__(self, in_features: int, out_features: int, dims: ParallelDims, bias: bool = True, *,
                 gather_output: bool = False, sequence_parallel: bool = False, seq_dim: int = 1,
                 padded_out_features: Optional[int] = None, input_in_region: bool = False, device=None,
                 dtype=None):
        super().__init__()
        padded = out_features if padded_out_features is None else padded_out_features
        if padded < out_features:
            raise ValueError(f"padded_out_features={padded} is smaller than out_features={out_features}")
        _check_divisible("ColumnParallelLinear output size", padded, dims)
        self.in_features, self.out_features, self.padded_out_features = in_features, out_features, padded
        if input_in_region and sequence_parallel:
            raise ValueError("ColumnParallelLinear: input_in_region and sequence_parallel both say how the input "
                             "enters the tensor-parallel region; pass one")
        self.dims, self.gather_output, self.input_in_region = dims, gather_output, input_in_region
        self.sequence_parallel, self.seq_dim = sequence_parallel, seq_dim
        self.weight = _sharded((padded // dims.tp_size, in_features), 0, device, dtype)
        self.bias = _sharded((padded // dims.tp_size,), 0, device, dtype) if bias else None

    @classmethod
    def from_full(cls, linear: nn.Linear, dims: ParallelDims, **kwargs) -> "ColumnParallelLinear":
        """This rank's rows of `linear` (keyword arguments as for the constructor)."""
        m = cls(linear.in_features, linear.out_features, dims, linear.bias is not None,
                device=linear.weight.device, dtype=linear.weight.dtype, **kwargs)
        with torch.no_grad():
            m.weight.copy_(_shard_of(linear.weight, dims, 0, m.padded_out_features))
            if m.bias is not None:
                m.bias.copy_(_shard_of(linear.bias, dims, 0, m.padded_out_features))
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_in_region:
            y = F.linear(x, self.weight, self.bias)
            y = gather_from_tp(y, self.dims.tp_group) if self.gather_output else y
        else:
            y = column_parallel_linear(x, self.weight, self.bias, self.dims.tp_group, self.gather_output,
                                       self.sequence_parallel, self.seq_dim)
        if self.gather_output and self.padded_out_features != self.out_features:
            y = y[..., :self.out_features]
        return y

    def full_weight(self) -> torch.Tensor:
        return _gather_full(self.weight, self.dims, 0, self.out_features)

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """The state dict of the equivalent nn.Linear (collective over the tensor group)."""
        sd = {"weight": self.full_weight()}
        if self.bias is not None:
            sd["bias"] = _gather_full(self.bias, self.dims, 0, self.out_features)
        return sd

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"({param_shape(self.weight)[0]} on this rank), bias={self.bias is not None}, "
                f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}"
                + (", input_in_region=True" if self.input_in_region else ""))


class RowParallelLinear(nn.Module):
    """nn.Linear with the input features split over the tensor ranks.

    Input: this rank's part of the last dim [..., in/tp] (`input_is_parallel`, the output of a
    column layer) or the whole [..., in], which is then split. Output: the sum over ranks, replicated
    [..., out] (or this rank's part of the sequence with `sequence_parallel`); the bias is
    replicated and added once, after the reduction.
    `reduce_output=False` returns this rank's partial sum instead: the caller reduces it once
    (`reduce_from_tp` / `reduce_scatter_to_sp`), e.g. where it leaves a whole attention or MLP.
    """

    def __init__(self, in_features: int, out_features: int, dims: ParallelDims, bias: bool = True, *,
                 input_is_parallel: bool = True, sequence_parallel: bool = False, seq_dim: int = 1,
                 reduce_output: bool = True, device=None, dtype=None):
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear with sequence_parallel needs input_is_parallel=True")
        if not reduce_output and (bias or sequence_parallel):
            raise ValueError("RowParallelLinear(reduce_output=False) returns a partial sum: it takes no bias "
                             "(it would be added tp times) and no sequence_parallel (the caller reduces)")
        _check_divisible("RowParallelLinear input size", in_features, dims)
        self.in_features, self.out_features = in_features, out_features
        self.dims, self.input_is_parallel, self.reduce_output = dims, input_is_parallel, reduce_output
        self.sequence_parallel, self.seq_dim = sequence_parallel, seq_dim
        self.weight = _sharded((out_features, in_features // dims.tp_size), 1, device, dtype)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_full(cls, linear: nn.Linear, dims: ParallelDims, **kwargs) -> "RowParallelLinear":
        """This rank's columns of `linear` (keyword arguments as for the constructor)."""
        m = cls(linear.in_features, linear.out_features, dims, linear.bias is not None,
                device=linear.weight.device, dtype=linear.weight.dtype, **kwargs)
        with torch.no_grad():
            m.weight.copy_(_shard_of(linear.weight, dims, 1))
            if m.bias is not None:
                m.bias.copy_(linear.bias)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.dims.tp_group
        if not self.input_is_parallel:
            x = scatter_to_tp(x, group)
        y = F.linear(x, self.weight)
        bias = self.bias
        if not self.reduce_output:
            return y
        if self.sequence_parallel:
            y = reduce_scatter_to_sp(y, group, self.seq_dim)
            # each rank sees its part of the sequence: sum the bias gradient over the tensor ranks
            bias = copy_to_tp(bias, group) if bias is not None else None
        else:
            y = reduce_from_tp(y, group)
        return y + bias if bias is not None else y

    def full_weight(self) -> torch.Tensor:
        return _gather_full(self.weight, self.dims, 1, self.in_features)

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """The state dict of the equivalent nn.Linear (collective over the tensor group)."""
        sd = {"weight": self.full_weight()}
        if self.bias is not None:
            sd["bias"] = self.bias.detach().clone()
        return sd

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} ({param_shape(self.weight)[1]} on this rank), "
                f"out_features={self.out_features}, bias={self.bias is not None}, "
                f"input_is_parallel={self.input_is_parallel}, sequence_parallel={self.sequence_parallel}"
                + ("" if self.reduce_output else ", reduce_output=False"))


class VocabParallelEmbedding(nn.Module):
    """nn.Embedding with the vocabulary rows split over the tensor ranks.

    The vocabulary is padded (`padded_vocab`: a multiple of 128 and of tp) with zero rows so it
    splits; rank r holds rows [r * V_padded/tp, (r+1) * V_padded/tp). Each rank looks up the ids in
    its range, writes zeros for the others, and an all-reduce (a reduce-scatter along the
    sequence with `sequence_parallel`) sums the parts. Parameters start at zero: use `from_full`.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, dims: ParallelDims, *,
                 padded_num_embeddings: Optional[int] = None, sequence_parallel: bool = False,
                 seq_dim: int = 1, device=None, dtype=None):
        super().__init__()
        padded = padded_vocab(num_embeddings, dims.tp_size) if padded_num_embeddings is None else padded_num_embeddings
        if padded < num_embeddings:
            raise ValueError(f"padded_num_embeddings={padded} is smaller than num_embeddings={num_embeddings}")
        _check_divisible("VocabParallelEmbedding padded vocabulary", padded, dims)
        self.num_embeddings, self.embedding_dim, self.padded_num_embeddings = num_embeddings, embedding_dim, padded
        self.dims, self.sequence_parallel, self.seq_dim = dims, sequence_parallel, seq_dim
        per_rank = padded // dims.tp_size
        self.vocab_start = dims.tp_rank * per_rank
        self.vocab_end = self.vocab_start + per_rank
        self.weight = _sharded((per_rank, embedding_dim), 0, device, dtype)

    @classmethod
    def from_full(cls, embedding: nn.Embedding, dims: ParallelDims, **kwargs) -> "VocabParallelEmbedding":
        """This rank's rows of `embedding`, padded (keyword arguments as for the constructor)."""
        if embedding.padding_idx is not None or embedding.max_norm is not None:
            raise ValueError("VocabParallelEmbedding does not support nn.Embedding's padding_idx or max_norm")
        m = cls(embedding.num_embeddings, embedding.embedding_dim, dims,
                device=embedding.weight.device, dtype=embedding.weight.dtype, **kwargs)
        with torch.no_grad():
            m.weight.copy_(_shard_of(embedding.weight, dims, 0, m.padded_num_embeddings))
        return m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        group = self.dims.tp_group
        if self.dims.tp_size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sp(out, group, self.seq_dim)
        return reduce_from_tp(out, group)

    def full_weight(self) -> torch.Tensor:
        """The unpadded [num_embeddings, dim] table (collective over the tensor group)."""
        return _gather_full(self.weight, self.dims, 0, self.num_embeddings)

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        return {"weight": self.full_weight()}

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings} (padded {self.padded_num_embeddings}; rows [{self.vocab_start}, "
                f"{self.vocab_end}) on this rank), {self.embedding_dim}, sequence_parallel={self.sequence_parallel}")

"""Cross-entropy over logits split along the vocabulary, without ever gathering them.

Each tensor rank holds logits for its vocab range [r * V_local, (r+1) * V_local). Per token:
    m   = max over all ranks of the local max          (all-reduce MAX)
    z_t = the target's logit - m, from the rank that holds it, 0 elsewhere;
    s   = sum over all ranks of sum(exp(logit - m))     (one all-reduce SUM for z_t and s together)
    loss = log(s) - z_t;   d loss / d logit = softmax - onehot(target), computed locally.
Two collectives of [tokens] floats instead of an all-gather of [tokens, V].

Padded vocabulary (see `padded_vocab`): with `vocab_size=V` the columns of ids >= V are left out
of the softmax (their logits count as -inf, their gradient is 0), so the loss equals
F.cross_entropy over the unpadded logits of the plain model. Targets must be ids in [0, V).
The loss is computed in float32 whatever the logits' dtype; the gradient has the logits' dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megams.parallel.mappings import all_reduce


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, group, vocab_start: int, vocab_size: Optional[int]):
        n_local = logits.size(-1)
        x = logits.float()
        n_real = n_local if vocab_size is None else max(0, min(n_local, vocab_size - vocab_start))
        if n_real < n_local:  # padded vocab rows: outside the softmax
            x = x.masked_fill(torch.arange(n_local, device=x.device) >= n_real, float("-inf"))

        m = all_reduce(x.max(dim=-1).values, group, op=dist.ReduceOp.MAX)
        x = x - m.unsqueeze(-1)  # a new tensor: the caller's logits are left alone

        here = (targets >= vocab_start) & (targets < vocab_start + n_local)
        local_t = (targets - vocab_start).masked_fill(~here, 0)
        z_t = x.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(~here, 0.0)

        exp = x.exp_()
        z_t, s = all_reduce(torch.stack([z_t, exp.sum(dim=-1)]), group).unbind(0)
        loss = s.log() - z_t

        ctx.save_for_backward(exp.div_(s.unsqueeze(-1)), here, local_t)  # exp is now the softmax
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, here, local_t = ctx.saved_tensors
        grad = softmax.scatter_add(-1, local_t.unsqueeze(-1), -here.unsqueeze(-1).to(softmax.dtype))
        grad = grad * grad_loss.unsqueeze(-1)
        return grad.to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, targets: torch.Tensor, dims,
                                 vocab_size: Optional[int] = None) -> torch.Tensor:
    """Per-token loss [...] (float32) from this rank's logits [..., V_padded/tp] and global target
    ids [...]; `vocab_size` (the real, unpadded V) keeps padded columns out of the softmax."""
    vocab_start = dims.tp_rank * local_logits.size(-1)
    return _VocabParallelCrossEntropy.apply(local_logits, targets, dims.tp_group, vocab_start, vocab_size)

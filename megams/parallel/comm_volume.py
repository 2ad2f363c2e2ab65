"""What tensor parallelism communicates per forward + backward of one micro-batch, from the config.

`predict_tp_comm(model_cfg, batch, seq_len, tp, sequence_parallel)` returns a `CommCounter` (calls
and full-tensor bytes per collective kind, and ring wire bytes) that must equal what `count_comm()`
measures around `loss_fn(model(tokens), targets).backward()` of the `apply_tp` model: the tests
check it call for call and byte for byte, and `tools/benchmark_tp.py` reports both. It spells out
the plans of `megams.parallel.tensor_parallel` (R = rows, each a [d] vector, of the tensor):

    tensor parallel                          | sequence parallel (input padded to K_S * tp)
    enter   bwd all-reduce R                 | fwd all-gather R, bwd reduce-scatter R
    leave   fwd all-reduce R                 | fwd reduce-scatter R, bwd all-gather R
    block (L positions): attention enter + leave, MLP enter + leave, of B*L rows each;
        SP adds one all-reduce of its norms' parameters, flat in one bucket (their gradients summed
        over the tensor ranks; likewise one per upsampling, aggregation and the final norm; under
        ZeRO-3 it is one per parameter, which this does not model)
    embedding  fwd all-reduce B*n            | fwd reduce-scatter B*n, bwd all-gather B*n
    head       bwd all-reduce B*T            | enter B*n (gathers the padded sequence)
    loss       all-reduce B*T floats (max) and 2*B*T floats (sum), always fp32
with n the padded length; multi-scale parts below (`_shorten`, `_upsample`, `_aggregation`).
"""
from __future__ import annotations

import math

from megams.parallel.mappings import CommCounter


def predict_tp_comm(cfg, batch: int, seq_len: int, tp: int, sequence_parallel: bool = False,
                    bytes_per_element: int = 4) -> CommCounter:
    """Collectives of one forward + backward of `batch` sequences of `seq_len` tokens (per rank)."""
    c = CommCounter()
    if tp == 1:
        return c
    sp = sequence_parallel
    d, e, B = cfg.d_model, bytes_per_element, batch
    K_S = cfg.total_shortening
    multiple = K_S * tp if sp else K_S
    n = -(-seq_len // multiple) * multiple

    def rec(kind, rows, width=d, elem=e):
        c.record(kind, rows * width * elem, tp)

    def enter(rows, in_sp):
        if in_sp:
            rec("all_gather", rows)
            rec("reduce_scatter", rows)
        else:
            rec("all_reduce", rows)

    leave = enter  # the same collectives, forward and backward swapped

    def sp_params(*numels):  # replicated parameters used on sequence shards: one bucket per module call
        if numels:
            rec("all_reduce", 1, sum(numels))

    norm = (d, d) if cfg.norm == "layernorm" else (d,)

    def attention(q_rows, kv_rows, in_sp):
        enter(q_rows, in_sp)
        if kv_rows:
            enter(kv_rows, in_sp)
        leave(q_rows, in_sp)

    def block(L, count=1):
        for _ in range(count):
            attention(B * L, 0, sp)
            enter(B * L, sp)  # MLP
            leave(B * L, sp)
            if sp:
                sp_params(*norm, *norm)

    def shorten(L, k):
        m = L // k
        if sp:  # gather the fine sequence; the coarse output's gradient is all-gathered back
            rec("all_gather", B * L)
            rec("all_gather", B * m)
        kind = cfg.pooling_kind
        if kind == "linear":  # row-parallel on split group features
            rec("all_reduce", B * m)  # fwd: output
            rec("all_gather", B * L)  # bwd: input gradient (k*d features of m rows)
        elif kind == "attention":  # one query per group attends to its k members; then an MLP
            attention(B * m, B * L, False)
            enter(B * m, False)
            leave(B * m, False)

    def upsample(m, k, merge=False):
        L = m * k
        if sp and cfg.upsampling != "linear":  # one bucket: scales.Merge on shards, attention's norms
            merge_params = {"norm": norm, "gate": (d,)}.get(cfg.scale_merge, ()) if merge else ()
            sp_params(*merge_params, *(norm + norm if cfg.upsampling == "attention" else ()))
        if cfg.upsampling == "linear":
            if sp:
                rec("all_gather", B * m)  # gather the coarse sequence
                rec("all_gather", B * L)  # bwd of keeping this rank's part of the output
            rec("all_gather", B * L)      # column output (k*d features of m rows)
            rec("all_reduce", B * m)      # bwd: input gradient
        elif cfg.upsampling == "attention":
            attention(B * L, B * m, sp)

    def aggregation(n_scales):
        if cfg.aggregation == "attention":
            attention(B * n, B * n * n_scales, sp)
            if sp:
                sp_params(*norm, n_scales * d)

    # embedding (+ learned positions)
    if sp:
        rec("reduce_scatter", B * n)
        rec("all_gather", B * n)
        if cfg.positions == "learned":
            rec("all_gather", n)
    else:
        rec("all_reduce", B * n)

    ks = cfg.shorten_factors
    lens = [n // math.prod(ks[:s]) for s in range(len(ks) + 1)]
    if cfg.type in ("vanilla", "retina"):
        block(n, cfg.n_layers)
    elif cfg.type == "bottom_up":
        block(n, cfg.layers_per_scale[0])
        for s in range(1, len(ks) + 1):
            shorten(lens[s - 1], ks[s - 1])
            block(lens[s], cfg.layers_per_scale[s])
        for s in range(1, len(ks) + 1):
            upsample(lens[s], n // lens[s], merge=cfg.aggregation == "sum")
        aggregation(len(ks) + 1)
        block(n, cfg.n_post)
    elif cfg.type == "top_down":
        block(n, cfg.n_pre)
        for s in range(1, len(ks) + 1):
            shorten(lens[s - 1], ks[s - 1])
        for s in reversed(range(len(ks) + 1)):
            if s < len(ks):
                upsample(lens[s + 1], ks[s], merge=True)
            block(lens[s], cfg.layers_per_scale[s])
    else:
        raise ValueError(f"unknown model.type {cfg.type!r}")

    # final norm, head, loss
    if sp:
        sp_params(*norm)
        enter(B * n, True)
    else:
        rec("all_reduce", B * seq_len)
    rec("all_reduce", B * seq_len, 1, 4)  # max logit per token (fp32)
    rec("all_reduce", B * seq_len, 2, 4)  # target logit and sum of exponentials
    return c

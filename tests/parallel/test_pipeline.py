"""Pipeline-parallel models (DeepSpeed's PipelineEngine, 1F1B) against one process, on real gloo ranks.

Every rank builds the plain model from the same seed and computes the single-process answer on
the whole global batch itself: the loss, every gradient, the gradient norm and the weights after
one AdamW step. The pipelined copy (after apply_tp when tp > 1) runs one `train_batch` over this
data rank's micro-batches; the gradients are captured just before the optimizer step (ZeRO-0),
the norm from the engine, the weights after the step (ZeRO-0 and ZeRO-1).

The explicit layouts cut the multi-scale models where carried state crosses the boundary:
bottom-up after `shorten.1` (the stage boundary carries h_2, h_0 and h_1), top-down inside the
coarse scales (it carries g and e_0, e_1). With tp = 2 DeepSpeed partitions that packed boundary
tensor over the tensor ranks (`pipe_partitioned`), which the cases assert is switched on.
"""
import pytest
import torch

from megams.config.schema import (ActivationCheckpointConfig, Config, DataConfig, OptimizerConfig, ParallelConfig,
                                  TrainingConfig)
from tests.helpers.multiproc import run_ranks
from tests.models.cases import tiny

T = 32
ATOL, RTOL = 1e-6, 1e-4  # fp32: |pipe - ref| <= ATOL + RTOL * max|ref|, per tensor

# (model type, model options, explicit layout or None for the cost partition)
MODELS = [
    ("vanilla", {}, None),
    ("vanilla", {"tie_embeddings": False, "positions": "learned", "norm": "rmsnorm"}, [2, 2]),
    ("bottom_up", {"aggregation": "attention", "upsampling": "attention"}, [5, 4]),  # cut after shorten.1
    ("bottom_up", {"aggregation": "sum", "pooling": "linear", "mlp": "swiglu"}, [4, 5]),  # inside scale 1
    ("top_down", {"upsampling": "attention"}, [5, 4]),                                   # cut after upsample.1
    ("top_down", {"pooling": "attention", "n_pre": 1, "shift_pad": "learned"}, [4, 6]),  # after shorten.1
    ("retina", {"retina_last_window": "all"}, None),
]


def make_cfg(model_type, over=None, *, pp=2, tp=1, world=2, layout=None, zero=0, clip=0.0, mb=2, gas=3, sp=False,
             ac=None, seq_len=T):
    dp = world // (pp * tp)
    return Config(
        model=tiny(model_type, vocab_size=256, **(over or {})),
        data=DataConfig(seq_len=seq_len),
        parallel=ParallelConfig(pipeline=pp, tensor=tp, zero_stage=zero, sequence_parallel=sp,
                                pipeline_partition="explicit" if layout else "cost", pipeline_layout=layout or [],
                                activation_checkpointing=ActivationCheckpointConfig(**(ac or {}))),
        training=TrainingConfig(micro_batch_size=mb, global_batch_size=mb * gas * dp, seed=0),
        # lr = eps = 1: the first AdamW update is ~g / (|g| + 1), linear in the gradient, so comparing the
        # weights after the step checks the gradient the optimizer saw (with eps = 1e-8 it is ~sign(g):
        # fp32 noise on a near-zero gradient would flip it)
        optimizer=OptimizerConfig(grad_clip=clip, warmup=0, lr=1.0, eps=1.0))


def _tokens(cfg, seed=0):
    G = cfg.training.global_batch_size
    ids = torch.randint(0, cfg.model.vocab_size, (G, cfg.data.seq_len + 1), generator=torch.Generator().manual_seed(seed))
    return ids[:, :-1], ids[:, 1:]


def _local(full, p, dims):
    """This tensor rank's piece of a full tensor, the way parameter `p` is split (vocab padded)."""
    if not getattr(p, "tensor_model_parallel", False):
        return full
    dim, n = p.partition_dim, p.shape[p.partition_dim]
    if n * dims.tp_size > full.shape[dim]:
        pad = list(full.shape)
        pad[dim] = n * dims.tp_size - full.shape[dim]
        full = torch.cat([full, full.new_zeros(pad)], dim)
    return full.narrow(dim, n * dims.tp_rank, n)


def _err(got, want):
    return (got - want).abs().max().item() / (ATOL + RTOL * want.abs().max().item())


def _reference(cfg, X, Y):
    """Single process: loss, gradients, gradient norm, weights after one clipped AdamW step."""
    from megams.models import build_model
    from megams.training.engine import param_groups
    from megams.training.loss import lm_loss
    ref = build_model(cfg.model, seed=cfg.training.seed)
    mb = cfg.training.micro_batch_size
    n = X.shape[0] // mb
    loss = 0.0
    for a in range(n):
        part = lm_loss(ref(X[a * mb:(a + 1) * mb]), Y[a * mb:(a + 1) * mb]) / n
        part.backward()
        loss += part.item()
    grads = {name: p.grad.clone() for name, p in ref.named_parameters()}
    o = cfg.optimizer
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), o.grad_clip if o.grad_clip > 0 else float("inf"))
    opt = torch.optim.AdamW(param_groups(ref, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    opt.step()
    return loss, grads, float(norm), {name: p.detach().clone() for name, p in ref.named_parameters()}


def pipeline_case(rank, world, model_type, over, kw):
    """One train_batch of the pipelined model vs `_reference`; {check: worst error ratio (<= 1 passes)}."""
    from megams.models import build_model
    from megams.parallel.checkpointing import apply_ac
    from megams.parallel.dims import build_parallel_dims
    from megams.parallel.random import seed_parallel_rng
    from megams.training.loss import lm_loss
    from megams.training.pipeline_step import PipelineTraining
    from megams.training.trainer import Layout
    cfg = make_cfg(model_type, over, world=world, **kw)
    dims = build_parallel_dims(cfg)
    seed_parallel_rng(cfg.training.seed, dims)
    X, Y = _tokens(cfg)
    ref_loss, ref_grads, ref_norm, ref_after = _reference(cfg, X, Y)

    model, loss_fn = build_model(cfg.model, seed=cfg.training.seed), lm_loss
    if dims.tp_size > 1:
        from megams.parallel.tensor_parallel import apply_tp
        model, loss_fn = apply_tp(model, dims, cfg)
    apply_ac(model, cfg, dims)
    names = {id(p): n for n, p in model.named_parameters()}
    pipe = PipelineTraining(cfg, Layout(world, rank, dims.dp_size, dims.dp_rank, dims.tp_size, dims.pp_size, dims))
    engine, _ = pipe.build_engine(model, loss_fn, "fp32")
    del model
    params = {names[id(p)]: p for p in engine.module.parameters()}

    grads = {}
    if cfg.parallel.zero_stage == 0:
        step = engine.optimizer.step

        def capture(*a, **k):  # after DeepSpeed's reductions and clipping, before the update
            grads.update({n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None})
            return step(*a, **k)
        engine.optimizer.step = capture

    mb, dp = cfg.training.micro_batch_size, dims.dp_size
    micro = [(X[s:s + mb], Y[s:s + mb]) for s in
             (a * mb * dp + dims.dp_rank * mb for a in range(cfg.grad_accum_steps(dp)))]
    loss = pipe.train_step(engine, micro)

    coef = min(1.0, cfg.optimizer.grad_clip / (ref_norm + 1e-6)) if cfg.optimizer.grad_clip > 0 else 1.0
    out = {"loss": abs(loss - ref_loss) / (ATOL + RTOL * abs(ref_loss)),
           "after step": max(_err(p.detach(), _local(ref_after[n], p, dims)) for n, p in params.items())}
    if grads:
        out["grads"] = max(_err(g, _local(ref_grads[n] * coef, params[n], dims)) for n, g in grads.items())
    if cfg.optimizer.grad_clip > 0:
        out["norm"] = abs(engine.get_global_grad_norm() - ref_norm) / (ATOL + RTOL * ref_norm)
    return {"errors": out, "names": sorted(params), "all": sorted(ref_grads),
            "pipe_partitioned": engine.is_pipe_partitioned, "stage": dims.pp_rank}


def _check(results):
    failures = []
    for (label, per_rank) in results:
        covered = set().union(*(r["names"] for r in per_rank))
        if covered != set(per_rank[0]["all"]):
            failures.append(f"{label}: parameters not in any stage: {set(per_rank[0]['all']) - covered}")
        for rank, r in enumerate(per_rank):
            bad = {k: round(v, 2) for k, v in r["errors"].items() if not v <= 1.0}
            if bad:
                failures.append(f"{label} rank {rank}: {bad}")
    assert not failures, "\n".join(failures)


def _run(world, cases, timeout=420):
    results = run_ranks(world, [(pipeline_case, (t, over, kw)) for t, over, kw in cases], timeout=timeout)
    return [(f"{t} {over} {kw}", r) for (t, over, kw), r in zip(cases, results)]


PP2 = [(t, over, {"layout": layout}) for t, over, layout in MODELS] + [
    ("bottom_up", {}, {"zero": 1, "clip": 0.05, "layout": [5, 4]}),  # ZeRO-1 with a clipping step
    ("top_down", {}, {"clip": 0.05}),                                # ZeRO-0: megams' pipeline clipping
    ("vanilla", {}, {"ac": {"mode": "full"}}),
]
PP2_TP2 = [(t, over, {"layout": layout, "tp": 2}) for t, over, layout in MODELS] + [
    ("bottom_up", {}, {"tp": 2, "sp": True, "layout": [5, 4]}),       # sequence parallel: boundaries not partitioned
    ("top_down", {}, {"tp": 2, "zero": 1, "clip": 0.05}),
    ("bottom_up", {}, {"tp": 2, "layout": [5, 4], "ac": {"mode": "attention", "partition_activations": True}}),
]
PP2_DP2 = [
    ("bottom_up", {}, {"layout": [5, 4], "zero": 1, "clip": 0.05}),
    ("retina", {}, {"ac": {"mode": "every_k", "every_k": 2, "cpu_checkpointing": True}}),
]


@pytest.fixture(scope="module")
def pp2():
    return _run(2, PP2)


@pytest.fixture(scope="module")
def pp2_tp2():
    return _run(4, PP2_TP2)


def test_every_model_matches_one_process_pp2(pp2):
    _check(pp2)


def test_every_model_matches_one_process_pp2_tp2(pp2_tp2):
    _check(pp2_tp2)
    assert all(r["pipe_partitioned"] for label, per_rank in pp2_tp2 if "'sp': True" not in label for r in per_rank)
    assert not any(r["pipe_partitioned"] for label, per_rank in pp2_tp2 if "'sp': True" in label for r in per_rank)


def test_pp2_dp2_and_zero1():
    _check(_run(4, PP2_DP2))


@pytest.mark.full
def test_pp3_and_pp2_tp2_dp2():
    cases = [("bottom_up", {}, {"pp": 3, "layout": [3, 3, 3]}), ("top_down", {}, {"pp": 3, "zero": 1, "clip": 0.05})]
    _check(_run(3, cases))
    _check(_run(8, [("bottom_up", {}, {"tp": 2, "layout": [5, 4], "zero": 1, "clip": 0.05}),
                    ("top_down", {}, {"tp": 2})], timeout=900))

"""megams.parallel primitives on real gloo ranks against the single-process computation.

Every rank builds the same full tensors / modules from fixed seeds, so it can compute the
single-process answer itself; a case returns {check name: max abs error} and the tests assert
each is below 1e-5 (fp32). All cases of a world size run in one `run_ranks` start-up.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from megams.parallel.cross_entropy import vocab_parallel_cross_entropy
from megams.parallel.dims import ParallelDims, padded_vocab
from megams.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                    column_parallel_linear)
from megams.parallel.mappings import (copy_to_tp, count_comm, gather_from_sp, gather_from_tp, reduce_from_tp,
                                      reduce_scatter_to_sp, scatter_to_sp, scatter_to_tp)
from megams.parallel.random import get_rng_tracker, parallel_seeds, seed_parallel_rng
from tests.helpers.multiproc import run_ranks

TOL = 1e-5
B, T, D = 2, 8, 8  # T divisible by 4 ranks (sequence parallel)


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _err(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.detach().float() - b.detach().float()).abs().max().item()


def _leaf(t):
    return t.detach().clone().requires_grad_()


def _tp_dims(rank, world_size):
    return ParallelDims(world_size, tp=world_size, rank=rank).build_groups()


# mappings ------------------------------------------------------------------------------------------
def _mappings_case(rank, n):  # n = world size = tensor-parallel size
    dims = _tp_dims(rank, n)
    g, r = dims.tp_group, rank
    chunk = lambda t, dim: t.chunk(n, dim)[r]  # noqa: E731
    X = _rand(B, T, 4 * n, seed=1)                            # a full (replicated) tensor
    Xs = [_rand(B, T, 4 * n, seed=10 + i) for i in range(n)]  # one per rank
    G = _rand(B, T, 4 * n, seed=2)                            # replicated upstream gradient
    Gs = [_rand(B, T, 4 * n, seed=20 + i) for i in range(n)]  # per-rank upstream gradients
    errs = {}

    x = _leaf(X)                                  # copy: every rank consumes x differently
    y = copy_to_tp(x, g)
    (y * Gs[r]).sum().backward()
    errs["copy fwd"], errs["copy bwd"] = _err(y, X), _err(x.grad, sum(Gs))

    x = _leaf(Xs[r])                              # reduce: partial sums -> total
    y = reduce_from_tp(x, g)
    (y * G).sum().backward()
    errs["reduce fwd"], errs["reduce bwd"] = _err(y, sum(Xs)), _err(x.grad, G)

    x = _leaf(X)                                  # scatter (last dim): each rank its part
    y = scatter_to_tp(x, g)
    (y * chunk(G, -1)).sum().backward()
    errs["scatter fwd"], errs["scatter bwd"] = _err(y, chunk(X, -1)), _err(x.grad, G)

    x = _leaf(chunk(X, -1))                       # gather (last dim): the whole from the parts
    y = gather_from_tp(x, g)
    (y * G).sum().backward()
    errs["gather fwd"], errs["gather bwd"] = _err(y, X), _err(x.grad, chunk(G, -1))

    x = _leaf(X)                                  # sequence parallel: split the sequence
    y = scatter_to_sp(x, g)
    (y * chunk(G, 1)).sum().backward()
    errs["sp scatter fwd"], errs["sp scatter bwd"] = _err(y, chunk(X, 1)), _err(x.grad, G)

    x = _leaf(chunk(X, 1))                        # gather the sequence for a TP consumer
    y = gather_from_sp(x, g)
    (y * Gs[r]).sum().backward()
    errs["sp gather fwd"], errs["sp gather bwd"] = _err(y, X), _err(x.grad, chunk(sum(Gs), 1))

    x = _leaf(chunk(X, 1))                        # ... for a replicated consumer
    y = gather_from_sp(x, g, tp_output_grad=False)
    (y * G).sum().backward()
    errs["sp gather fwd (replicated)"], errs["sp gather bwd (replicated)"] = _err(y, X), _err(x.grad, chunk(G, 1))

    x = _leaf(Xs[r])                              # reduce-scatter: sum, keep my part of the sequence
    y = reduce_scatter_to_sp(x, g)
    (y * chunk(G, 1)).sum().backward()
    errs["sp reduce-scatter fwd"], errs["sp reduce-scatter bwd"] = _err(y, chunk(sum(Xs), 1)), _err(x.grad, G)
    return errs


# layers ----------------------------------------------------------------------------------------------
def _linear(i, o, seed, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(i, o, bias=bias)


def _grads(m):
    return {name: p.grad for name, p in m.named_parameters()}


def _layers_case(rank, n):  # n = world size = tensor-parallel size
    dims = _tp_dims(rank, n)
    r = rank
    chunk = lambda t, dim: t.chunk(n, dim)[r]  # noqa: E731
    X, G = _rand(B, T, D, seed=3), _rand(B, T, 6 * n, seed=4)
    errs = {}

    # column: replicated input -> my output features
    full = _linear(D, 6 * n, seed=5)
    x = _leaf(X)
    ref = full(x)
    (ref * G).sum().backward()
    for gather in (False, True):
        col = ColumnParallelLinear.from_full(full, dims, gather_output=gather)
        xt = _leaf(X)
        y = col(xt)
        (y * (G if gather else chunk(G, -1))).sum().backward()
        tag = f"column gather={gather}"
        errs[f"{tag} out"] = _err(y, ref if gather else chunk(ref, -1))
        errs[f"{tag} dx"] = _err(xt.grad, x.grad)
        errs[f"{tag} dW"] = _err(col.weight.grad, chunk(full.weight.grad, 0))
        errs[f"{tag} db"] = _err(col.bias.grad, chunk(full.bias.grad, 0))
        errs[f"{tag} full_weight"] = _err(col.full_weight(), full.weight)
    assert col.weight.tensor_model_parallel and col.weight.partition_dim == 0

    # column over a padded output (an untied head over a padded vocab), gathered and cropped
    full = _linear(D, 5 * n + 1, seed=6)
    col = ColumnParallelLinear.from_full(full, dims, gather_output=True, padded_out_features=6 * n)
    errs["column padded out"] = _err(col(X), full(X))
    errs["column padded full_weight"] = _err(col.full_state_dict()["bias"], full.bias)

    # row: my input features -> replicated output, bias once
    full = _linear(6 * n, D, seed=7)
    Xr, Gr = _rand(B, T, 6 * n, seed=8), _rand(B, T, D, seed=9)
    x = _leaf(Xr)
    ref = full(x)
    (ref * Gr).sum().backward()
    for parallel_in in (True, False):
        row = RowParallelLinear.from_full(full, dims, input_is_parallel=parallel_in)
        xt = _leaf(chunk(Xr, -1) if parallel_in else Xr)
        y = row(xt)
        (y * Gr).sum().backward()
        tag = f"row input_is_parallel={parallel_in}"
        errs[f"{tag} out"] = _err(y, ref)
        errs[f"{tag} dx"] = _err(xt.grad, chunk(x.grad, -1) if parallel_in else x.grad)
        errs[f"{tag} dW"] = _err(row.weight.grad, chunk(full.weight.grad, 1))
        errs[f"{tag} db"] = _err(row.bias.grad, full.bias.grad)
    errs["row full_weight"] = _err(row.full_weight(), full.weight)
    assert row.weight.tensor_model_parallel and not hasattr(row.bias, "tensor_model_parallel")

    # column -> gelu -> row (an MLP), plain and sequence parallel, counting the communication
    mlp = nn.Sequential(_linear(D, 4 * n, seed=10), nn.GELU(), _linear(4 * n, D, seed=11))
    x = _leaf(X)
    ref = mlp(x)
    (ref * Gr).sum().backward()
    for sp in (False, True):
        tp = nn.Sequential(ColumnParallelLinear.from_full(mlp[0], dims, sequence_parallel=sp), nn.GELU(),
                           RowParallelLinear.from_full(mlp[2], dims, sequence_parallel=sp))
        xt = _leaf(chunk(X, 1) if sp else X)
        with count_comm() as comm:
            y = tp(xt)
            (y * (chunk(Gr, 1) if sp else Gr)).sum().backward()
        tag = f"mlp sequence_parallel={sp}"
        errs[f"{tag} out"] = _err(y, chunk(ref, 1) if sp else ref)
        errs[f"{tag} dx"] = _err(xt.grad, chunk(x.grad, 1) if sp else x.grad)
        split_dim = {"0.weight": 0, "0.bias": 0, "2.weight": 1, "2.bias": None}  # row bias: replicated
        for name, grad in _grads(mlp).items():
            want = grad if split_dim[name] is None else chunk(grad, split_dim[name])
            errs[f"{tag} d{name}"] = _err(_grads(tp)[name], want)
        # fwd: row all-reduce, bwd: column all-reduce; or with sequence parallelism the
        # all-gather / reduce-scatter pairs and the row bias' gradient all-reduce
        act = B * T * D * 4  # bytes of one [B, T, D] fp32 activation
        calls, nbytes = ({"all_gather": 2, "reduce_scatter": 2, "all_reduce": 1}, 4 * act + D * 4) if sp else \
            ({"all_reduce": 2}, 2 * act)
        errs[f"{tag} comm calls"] = float(dict(comm.calls) != calls)
        errs[f"{tag} comm bytes"] = float(comm.total_bytes != nbytes)

    # vocab-parallel embedding over a padded vocab, plain and sequence parallel
    V = 300  # padded to 384
    torch.manual_seed(12)
    emb = nn.Embedding(V, D)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(13))
    ids[0, :3] = torch.tensor([0, V - 1, padded_vocab(V, n) // n])  # both ends and a shard boundary
    ref = emb(ids)
    (ref * Gr).sum().backward()
    ref_grad = torch.cat([emb.weight.grad, torch.zeros(padded_vocab(V, n) - V, D)])
    for sp in (False, True):
        vp = VocabParallelEmbedding.from_full(emb, dims, sequence_parallel=sp)
        y = vp(ids)
        (y * (chunk(Gr, 1) if sp else Gr)).sum().backward()
        tag = f"embedding sequence_parallel={sp}"
        errs[f"{tag} out"] = _err(y, chunk(ref, 1) if sp else ref)
        errs[f"{tag} dW"] = _err(vp.weight.grad, chunk(ref_grad, 0))
    errs["embedding full_weight"] = _err(vp.full_weight(), emb.weight)
    return errs


# cross-entropy -----------------------------------------------------------------------------------------
def _cross_entropy_case(rank, n):  # n = world size = tensor-parallel size
    dims = _tp_dims(rank, n)
    chunk = lambda t: t.chunk(n, -1)[rank]  # noqa: E731
    errs = {}
    W = _rand(B, T, seed=14).abs()  # per-token loss weights: a non-uniform upstream gradient
    for V in (256, 300, 130):  # unpadded; padded; padded so far that a 4-way shard holds only padding
        Vp = padded_vocab(V, n)
        logits = _rand(B, T, Vp, seed=15) * 3
        targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(16))
        targets[0, :2] = torch.tensor([0, V - 1])
        full = _leaf(logits)
        ref = F.cross_entropy(full[..., :V].reshape(-1, V), targets.reshape(-1), reduction="none").view(B, T)
        (ref * W).sum().backward()
        local = _leaf(chunk(logits))
        loss = vocab_parallel_cross_entropy(local, targets, dims, vocab_size=V)
        (loss * W).sum().backward()
        errs[f"ce V={V} loss"] = _err(loss, ref)
        errs[f"ce V={V} grad"] = _err(local.grad, chunk(full.grad))  # padded columns: 0 in both

    # bf16 logits: float32 loss, bf16 gradient
    logits = _rand(B, T, 256, seed=17)
    targets = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(18))
    local = _leaf(chunk(logits).bfloat16())
    loss = vocab_parallel_cross_entropy(local, targets, dims)
    loss.sum().backward()
    ref = F.cross_entropy(logits.bfloat16().float().view(-1, 256), targets.view(-1), reduction="none").view(B, T)
    errs["ce bf16 loss"] = _err(loss, ref)
    errs["ce bf16 dtypes"] = float((loss.dtype, local.grad.dtype) != (torch.float32, torch.bfloat16))

    # the whole tied path: vocab-parallel embedding -> LM head with the same weight -> loss
    V = 300
    torch.manual_seed(19)
    emb = nn.Embedding(V, D)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(20))
    targets = ids.roll(-1, 1)
    ref = F.cross_entropy((emb(ids) @ emb.weight.T).view(-1, V), targets.view(-1))
    ref.backward()
    for sp in (False, True):
        vp = VocabParallelEmbedding.from_full(emb, dims, sequence_parallel=sp)
        h = vp(ids)  # [B, T/tp, D] with sequence parallelism
        logits = column_parallel_linear(h, vp.weight, None, dims.tp_group, sequence_parallel=sp)
        loss = vocab_parallel_cross_entropy(logits, targets, dims, vocab_size=V).mean()
        loss.backward()
        ref_grad = torch.cat([emb.weight.grad, torch.zeros(padded_vocab(V, n) - V, D)])
        errs[f"tied sp={sp} loss"] = _err(loss, ref)
        errs[f"tied sp={sp} dW"] = _err(vp.weight.grad, ref_grad.chunk(n, 0)[rank])
    return errs


# dropout streams -------------------------------------------------------------------------------------
def _rng_case(rank, world_size):
    dims = ParallelDims(world_size, tp=2, rank=rank).build_groups()  # tp2 x dp2
    seed_parallel_rng(1234, dims)
    replicated = F.dropout(torch.ones(64), 0.5) != 0
    with get_rng_tracker().fork():
        split = F.dropout(torch.ones(64), 0.5) != 0
    with get_rng_tracker().fork():
        split_again = F.dropout(torch.ones(64), 0.5) != 0
    after = torch.rand(8)
    torch.manual_seed(parallel_seeds(1234, dims.dp_rank, dims.pp_rank, dims.tp_rank)[0])
    F.dropout(torch.ones(64), 0.5)
    untouched = torch.equal(after, torch.rand(8))  # forking left the default stream alone
    return replicated, split, split_again, untouched


# DeepSpeed with the mpu -----------------------------------------------------------------------------
def _mpu_grad_norm_case(rank, world_size):
    import deepspeed
    from deepspeed.runtime.utils import clip_grad_norm_

    dims = ParallelDims(world_size, tp=2, rank=rank).build_groups()  # tp2 x dp2
    torch.manual_seed(21)
    full = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D))
    X = _rand(4, T, D, seed=22)
    full(X).square().mean().backward()
    expected = torch.sqrt(sum(p.grad.square().sum() for p in full.parameters())).item()

    norms = {}
    for stage in (0, 1):
        model = nn.Sequential(copy.deepcopy(full[0]), ColumnParallelLinear.from_full(full[1], dims), nn.GELU(),
                              RowParallelLinear.from_full(full[3], dims))
        model.zero_grad()
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.0), mpu=dims.mpu,
            config={"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                    "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                    "steps_per_print": 10 ** 9})
        mine = X[2 * dims.dp_rank: 2 * dims.dp_rank + 2]  # this data rank's micro-batch
        engine.backward(engine(mine).square().mean())
        if stage == 0:  # fp32 without ZeRO: the engine clips with deepspeed.runtime.utils.clip_grad_norm_
            norms[stage] = float(clip_grad_norm_(list(model.parameters()), max_norm=1e9, mpu=dims.mpu))
        else:
            engine.step()
            norms[stage] = float(engine.get_global_grad_norm())
    return expected, norms


# the runs ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_ranks():
    cases = [(_mappings_case, ()), (_layers_case, ()), (_cross_entropy_case, ())]
    return dict(zip(("mappings", "layers", "cross_entropy"), run_ranks(2, cases, timeout=120)))


@pytest.fixture(scope="module")
def four_ranks():
    cases = [(_mappings_case, ()), (_cross_entropy_case, ()), (_rng_case, ()), (_mpu_grad_norm_case, ())]
    return dict(zip(("mappings", "cross_entropy", "rng", "mpu"), run_ranks(4, cases, timeout=180)))


def _assert_small(per_rank):
    for rank, errs in enumerate(per_rank):
        bad = {k: v for k, v in errs.items() if not v < TOL}
        assert not bad, f"rank {rank}: {bad}"


@pytest.mark.parametrize("part", ["mappings", "layers", "cross_entropy"])
def test_two_ranks(two_ranks, part):
    _assert_small(two_ranks[part])


@pytest.mark.parametrize("part", ["mappings", "cross_entropy"])
def test_four_ranks(four_ranks, part):
    _assert_small(four_ranks[part])


def test_dropout_streams_tp2_dp2(four_ranks):
    (rep0, split0, again0, ok0), (rep1, split1, _, ok1), (rep2, split2, _, ok2), (rep3, split3, _, ok3) = \
        four_ranks["rng"]
    # default stream: the same on the tensor ranks of a replica, different across data ranks
    assert torch.equal(rep0, rep1) and torch.equal(rep2, rep3) and not torch.equal(rep0, rep2)
    # model-parallel stream: different on every rank, advancing from one fork to the next
    masks = [split0, split1, split2, split3]
    assert all(not torch.equal(masks[i], masks[j]) for i in range(4) for j in range(i + 1, 4))
    assert not torch.equal(split0, again0)
    assert ok0 and ok1 and ok2 and ok3


def test_deepspeed_grad_norm_counts_replicated_params_once(four_ranks):
    for expected, norms in four_ranks["mpu"]:
        assert norms[0] == pytest.approx(expected, rel=1e-5), norms
        assert norms[1] == pytest.approx(expected, rel=1e-5), norms


def test_single_process_is_a_group_of_one():
    dims = ParallelDims(1)
    X = _rand(B, T, D, seed=23)
    full = _linear(D, D, seed=24)
    with count_comm() as comm:
        assert torch.equal(ColumnParallelLinear.from_full(full, dims)(X), full(X))
        assert torch.equal(RowParallelLinear.from_full(full, dims, sequence_parallel=True)(X), full(X))
        assert copy_to_tp(X, dims.tp_group) is X
    assert comm.total_bytes == 0

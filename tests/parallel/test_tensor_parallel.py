"""`apply_tp` models against the single-process model with the same weights, on real gloo ranks.

Every rank builds the plain model from the same seed, so it computes the single-process answer
itself: loss and every parameter gradient on the whole batch. The tensor-parallel copy (tp=2)
runs this rank's data-parallel micro-batch; its gradients are averaged over the data ranks (as
DeepSpeed does) and gathered to full shapes (`full_grads`). Each case also checks the export
(`full_state_dict` equals the plain state dict exactly), `parameter_count`, and that the
collectives measured by `count_comm` are exactly those `predict_tp_comm` predicts.

Options: every model's pairwise option matrix (tests/models/cases.py) plus sequence parallelism and
a sequence length that needs padding, pairwise by default, the full cross product under `-m full`.
All cases of a world size run in one `run_ranks` start-up.
"""
import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megams.config.schema import Config
from megams.models import build_model
from megams.parallel.comm_volume import predict_tp_comm
from megams.parallel.dims import ParallelDims
from megams.parallel.mappings import count_comm
from megams.parallel.random import seed_parallel_rng
from megams.parallel.tensor_parallel import apply_tp, full_grads, full_state_dict, parameter_count
from tests.helpers.multiproc import run_ranks
from tests.models.cases import OPTIONS, case_id, pairwise, tiny

TP = 2
B = 2        # sequences per data-parallel rank
V = 300      # padded to 384: tensor rank 1 holds real rows 192..299 and 84 padding rows
ATOL, RTOL = 1e-6, 1e-4  # fp32: |tp - ref| <= ATOL + RTOL * max|ref|, per parameter
TP_OPTIONS = {"sequence_parallel": [False, True], "seq_len": [32, 20]}  # 20: padded (to K_S, or K_S * tp)


def model_cases(full: bool = False):
    """[(model type, options)] over every model: pairwise, or the full cross product."""
    out = []
    for model_type, opts in OPTIONS.items():
        opts = {**opts, **TP_OPTIONS}
        combos = [dict(zip(opts, v)) for v in itertools.product(*opts.values())] if full else pairwise(opts)
        out += [(model_type, c) for c in combos]
    return out


def _tokens(n, T, seed, device="cpu"):
    ids = torch.randint(0, V, (n, T + 1), generator=torch.Generator().manual_seed(seed)).to(device)
    return ids[:, :-1], ids[:, 1:]


def _compare(tp_grads, ref_grads):
    """Worst |tp - ref| / (ATOL + RTOL * max|ref|) over parameters (<= 1 passes), and where."""
    worst, where = 0.0, None
    for name, ref in ref_grads.items():
        got = tp_grads.get(name)
        if got is None or got.shape != ref.shape:
            return float("inf"), f"{name}: {None if got is None else tuple(got.shape)} vs {tuple(ref.shape)}"
        ratio = ((got - ref).abs().max() / (ATOL + RTOL * ref.abs().max())).item()
        if ratio > worst:
            worst, where = ratio, name
    return worst, where


def _equivalence(dims, model_type, combo, seed, device="cpu"):
    combo = dict(combo)
    sp, T = combo.pop("sequence_parallel"), combo.pop("seq_len")
    mcfg = tiny(model_type, vocab_size=V, **combo)
    cfg = Config(model=mcfg, data={"seq_len": 32}, parallel={"tensor": TP, "sequence_parallel": sp})
    inputs, targets = _tokens(B * dims.dp_size, T, seed, device)

    ref = build_model(mcfg, seed=seed, device=device)
    ref_loss = F.cross_entropy(ref(inputs).reshape(-1, V), targets.reshape(-1))
    ref_loss.backward()
    ref_grads = {name: p.grad for name, p in ref.named_parameters()}

    model, loss_fn = apply_tp(build_model(mcfg, seed=seed, device=device), dims, cfg)
    state = full_state_dict(model)
    plain_state = ref.state_dict()
    mine = slice(B * dims.dp_rank, B * (dims.dp_rank + 1))
    with count_comm() as comm:
        loss = loss_fn(model(inputs[mine]), targets[mine])
        loss.backward()
    if dims.dp_size > 1:  # DeepSpeed's data-parallel average (equal micro-batches: the global mean)
        for p in model.parameters():
            dist.all_reduce(p.grad, group=dims.dp_group)
            p.grad /= dims.dp_size
        loss = loss.detach().clone()
        dist.all_reduce(loss, group=dims.dp_group)
        loss /= dims.dp_size
    grad_ratio, worst = _compare(full_grads(model), ref_grads)
    predicted = predict_tp_comm(mcfg, B, T, TP, sp)
    return {
        "case": f"{model_type}-{case_id({**combo, 'sp': sp, 'T': T})}",
        "loss": abs(loss.item() - ref_loss.item()),
        "grads": grad_ratio, "worst": worst,
        "export": sorted(state) == sorted(plain_state) and all(torch.equal(state[k], plain_state[k]) for k in state),
        "count": parameter_count(model) == sum(p.numel() for p in ref.parameters()),
        "comm": (dict(comm.calls), dict(comm.bytes)),
        "predicted": (dict(predicted.calls), dict(predicted.bytes)),
    }


def _equivalence_case(rank, world_size, cases, device="cpu"):
    dims = ParallelDims(world_size, tp=TP, rank=rank).build_groups()
    return [_equivalence(dims, t, c, seed=i, device=device) for i, (t, c) in enumerate(cases)]


def _dropout_case(rank, world_size):
    """tp2 x dp2, dropout on: replicated activations stay identical on the tensor ranks of a replica
    (residual dropout from the default stream) and differ across data ranks."""
    dims = ParallelDims(world_size, tp=TP, rank=rank).build_groups()
    out = {}
    for sp in (False, True):
        mcfg = tiny("bottom_up", vocab_size=V, dropout=0.2, pooling="attention", upsampling="attention")
        cfg = Config(model=mcfg, data={"seq_len": 32}, parallel={"tensor": TP, "sequence_parallel": sp})
        model, _ = apply_tp(build_model(mcfg, seed=0), dims, cfg)
        seed_parallel_rng(1234, dims)
        model.train()
        out[sp] = model.forward_hidden(_tokens(B, 32, seed=0)[0]).detach()
    return out


def _check(results):
    failures = []
    for rank, per_case in enumerate(results):
        for r in per_case:
            if not (r["loss"] < 1e-5 and r["grads"] <= 1.0 and r["export"] and r["count"]
                    and r["comm"] == r["predicted"]):
                failures.append(f"rank {rank} {r['case']}: loss err {r['loss']:.2e}, grads {r['grads']:.3g} "
                                f"(worst {r['worst']}), export {r['export']}, count {r['count']}, "
                                f"comm {r['comm']} predicted {r['predicted']}")
    assert not failures, "\n".join(failures[:20])


@pytest.fixture(scope="module")
def tp2():
    return run_ranks(2, [(_equivalence_case, (model_cases(),))], timeout=300)[0]


@pytest.fixture(scope="module")
def tp2_dp2():
    return run_ranks(4, [(_equivalence_case, (model_cases(),)), (_dropout_case, ())], timeout=400)


def test_every_model_matches_one_process_tp2(tp2):
    assert len(tp2[0]) == len(model_cases()) and {r["case"].split("-")[0] for r in tp2[0]} == set(OPTIONS)
    _check(tp2)


def test_every_model_matches_one_process_tp2_dp2(tp2_dp2):
    _check(tp2_dp2[0])


def test_dropout_masks_follow_the_layout(tp2_dp2):
    hidden = tp2_dp2[1]  # per rank {sp: hidden}; ranks (dp, tp): 0 (0,0), 1 (0,1), 2 (1,0), 3 (1,1)
    for sp in (False, True):
        assert torch.equal(hidden[0][sp], hidden[1][sp]) and torch.equal(hidden[2][sp], hidden[3][sp])
        assert not torch.equal(hidden[0][sp], hidden[2][sp])


@pytest.mark.full
@pytest.mark.timeout(7200)
def test_full_matrix_tp2():  # 4,928 cases, ~15 min on 2 cores
    _check(run_ranks(2, [(_equivalence_case, (model_cases(full=True),))], timeout=7200)[0])


@pytest.mark.full
@pytest.mark.timeout(7200)
def test_full_matrix_tp2_dp2():  # ~45 min on 2 cores
    _check(run_ranks(4, [(_equivalence_case, (model_cases(full=True),))], timeout=7200)[0])


# NCCL ---------------------------------------------------------------------------------------------------
def _nccl_case(rank, world_size, cases):
    torch.cuda.set_device(rank)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return _equivalence_case(rank, world_size, cases, device=f"cuda:{rank}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < TP,
                    reason=f"needs {TP} CUDA devices (NCCL refuses two ranks on one GPU)")
def test_every_model_matches_one_process_nccl():
    _check(run_ranks(TP, [(_nccl_case, (model_cases(),))], timeout=600, backend="nccl")[0])


# in-process ------------------------------------------------------------------------------------------------
def test_one_rank_is_the_plain_model():
    """tp=1 without torch.distributed: groups of one, padded vocabulary, same loss and gradients."""
    mcfg = tiny("bottom_up", vocab_size=V, pooling="attention", upsampling="linear")
    cfg = Config(model=mcfg, data={"seq_len": 32})
    inputs, targets = _tokens(B, 32, seed=0)
    ref = build_model(mcfg, seed=0)
    ref_loss = F.cross_entropy(ref(inputs).reshape(-1, V), targets.reshape(-1))
    ref_loss.backward()
    model, loss_fn = apply_tp(build_model(mcfg, seed=0), ParallelDims(1), cfg)
    logits = model(inputs)
    assert logits.shape == (B, 32, 384)
    loss = loss_fn(logits, targets)
    loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    ratio, worst = _compare(full_grads(model), {n: p.grad for n, p in ref.named_parameters()})
    assert ratio <= 1.0, worst
    assert parameter_count(model) == sum(p.numel() for p in ref.parameters())


def test_layer_flags_refuse_contradictions():
    from megams.parallel.layers import ColumnParallelLinear, RowParallelLinear
    dims = ParallelDims(1)
    with pytest.raises(ValueError, match="input_in_region and sequence_parallel"):
        ColumnParallelLinear(4, 4, dims, input_in_region=True, sequence_parallel=True)
    with pytest.raises(ValueError, match="reduce_output=False"):
        RowParallelLinear(4, 4, dims, bias=True, reduce_output=False)


def test_model_that_does_not_split_is_refused():
    from megams.config.loader import ConfigError
    mcfg = tiny("vanilla", vocab_size=V, n_heads=1)
    with pytest.raises(ConfigError, match="model.n_heads=1 is not divisible by parallel.tensor=2"):
        apply_tp(build_model(mcfg), ParallelDims(2, tp=2), Config(model=mcfg, data={"seq_len": 32}))

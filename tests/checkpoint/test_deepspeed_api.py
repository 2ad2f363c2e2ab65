"""`checkpoint.load_from` writes into a live DeepSpeed engine (megams.checkpoint.reshard._Writer) through
DeepSpeed's public API where there is one (deepspeed.utils.safe_set_full_fp32_param /
safe_set_full_optimizer_state / safe_set_local_*, lazy_init_hp_params_optimizer_state) and three
private fields where there is none; those are pinned here with the DeepSpeed version.

Checked on 2 real gloo ranks for ZeRO 0-3 (fp32; bf16 with ZeRO-1): what the writer put in is what
DeepSpeed's public getters (safe_get_full_*) return, the AdamW step carries (the next step is
step + 1, so DeepSpeed used the state rather than making its own), and ZeRO-0 moments land on the
parameter's device and dtype (issue 12: they stayed on the CPU)."""
import os
from types import SimpleNamespace

import pytest
import torch

from tests.helpers.multiproc import run_ranks
from tests.training.common import ROOT

TESTED_DEEPSPEED = ("0.19.8",)
PRIVATE_FIELDS = ("DeepSpeedZeroOptimizer.optimizer / BF16_Optimizer.optimizer (the wrapped torch AdamW)",
                  "DeepSpeedZeroOptimizer_Stage3.fp32_partitioned_groups_flat", "ZeRO-3 parameter .ds_tensor")


def test_deepspeed_version_is_the_one_the_private_fields_were_checked_with():
    import deepspeed
    assert deepspeed.__version__ in TESTED_DEEPSPEED, (
        f"deepspeed {deepspeed.__version__}: megams.checkpoint.reshard._Writer relies on private fields "
        f"({'; '.join(PRIVATE_FIELDS)}) checked with deepspeed {', '.join(TESTED_DEEPSPEED)}: rerun "
        "tests/checkpoint/test_deepspeed_api.py::test_writer_through_the_public_api and add the version here")


def _values(model):
    g = torch.Generator().manual_seed(3)
    return {n: torch.randn(p.ds_shape if hasattr(p, "ds_shape") else p.shape, generator=g)
            for n, p in model.named_parameters()}


def _writer_case(rank, world, zero, precision):
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from megams.checkpoint.layout import optimizer_groups
    from megams.checkpoint.reshard import _Writer
    from megams.config import load_config
    from megams.training.engine import build_engine, precision_mode
    cfg = load_config(os.path.join(ROOT, "configs", "tiny", "vanilla.yaml"),
                      [f"parallel.zero_stage={zero}", f"training.precision={precision}",
                       "training.global_batch_size=2", "training.micro_batch_size=1"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))  # odd sizes: ZeRO-3 pads
    groups = optimizer_groups(model)
    engine, _, _ = build_engine(cfg, model, world, precision_mode(cfg, "cpu"))
    fields = {"optimizer.optimizer": zero == 0 or hasattr(engine.optimizer, "optimizer")}
    if zero == 3:
        fields["fp32_partitioned_groups_flat"] = hasattr(engine.optimizer, "fp32_partitioned_groups_flat")
        fields["ds_tensor"] = all(hasattr(p, "ds_tensor") for p in engine.module.parameters())
    values = _values(engine.module)
    moments = {n: {"exp_avg": v * 0.5 + 1, "exp_avg_sq": v * v} for n, v in values.items()}
    writer = _Writer(engine, groups, adam_step=5, dp_rank=rank)
    named = dict(engine.module.named_parameters())
    for n, p in named.items():
        writer.weights(p, values[n])
        writer.moments(p, moments[n])
    out = {"fields": fields, "errors": []}
    for n, p in named.items():
        if zero == 0:
            st = engine.optimizer.state[p]
            got = {"fp32": p.detach(), **{k: st[k] for k in ("exp_avg", "exp_avg_sq")}}
            out.setdefault("devices", []).append((str(st["exp_avg"].device), str(p.device), st["exp_avg"].dtype,
                                                  p.dtype, str(st["step"].device), float(st["step"])))
        else:
            got = {"fp32": safe_get_full_fp32_param(p),
                   **{k: safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")}}
        want = {"fp32": values[n], **moments[n]}
        for k in want:
            if not torch.equal(got[k].float().reshape(want[k].shape).cpu(), want[k]):
                out["errors"].append(f"{n} {k}")
        if zero in (1, 2) and not torch.equal(p.detach().float(), values[n].to(p.dtype).float()):
            out["errors"].append(f"{n} module weight")
    if zero == 3:
        with deepspeed.zero.GatheredParameters(list(named.values())):
            for n, p in named.items():
                if not torch.equal(p.detach().float(), values[n].to(p.dtype).float()):
                    out["errors"].append(f"{n} module weight (ZeRO-3 partition)")
    dtype = next(engine.module.parameters()).dtype
    loss = engine(torch.ones(1, 7, dtype=dtype)).float().sum()
    engine.backward(loss)
    engine.step()
    base = engine.optimizer if zero == 0 else engine.optimizer.optimizer
    out["steps"] = sorted({float(st["step"]) for st in base.state.values()})
    return out


@pytest.mark.parametrize("zero,precision", [(0, "fp32"), (1, "fp32"), (1, "bf16"), (2, "fp32"), (3, "fp32")])
def test_writer_through_the_public_api(zero, precision):
    out = run_ranks(2, [(_writer_case, (zero, precision))], timeout=300, env={"OMP_NUM_THREADS": "1"})[0]
    for rank, r in enumerate(out):
        assert all(r["fields"].values()), (rank, r["fields"])
        assert r["errors"] == [], (rank, r["errors"])
        assert r["steps"] == [6.0], (rank, r["steps"])  # DeepSpeed stepped from the carried step 5
        for moment_dev, param_dev, moment_dtype, param_dtype, step_dev, step in r.get("devices", []):
            assert (moment_dev, moment_dtype, step_dev, step) == (param_dev, param_dtype, "cpu", 5.0)


def test_zero0_moments_land_on_the_parameters_device_and_dtype():
    """Issue 12: with ZeRO-0 the moments were left on the CPU (read there) whatever the parameter's
    device. A meta-device parameter shows where they go without a GPU: the parameter's device."""
    from megams.checkpoint.reshard import _Writer
    p = torch.nn.Parameter(torch.empty(4, 3, device="meta", dtype=torch.bfloat16))
    q = torch.nn.Parameter(torch.empty(3, device="meta"))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [q], "fused": False}])
    engine = SimpleNamespace(optimizer=opt, zero_optimization_stage=lambda: 0,
                             module=SimpleNamespace(named_parameters=lambda: [("p", p), ("q", q)]))
    w = _Writer(engine, [["p"], ["q"]], adam_step=9, dp_rank=0)
    for param in (p, q):
        w.moments(param, {"exp_avg": torch.ones(param.shape), "exp_avg_sq": torch.ones(param.shape)})
        st = opt.state[param]
        for k in ("exp_avg", "exp_avg_sq"):
            assert st[k].device == param.device and st[k].dtype == param.dtype, (k, st[k].device, st[k].dtype)
        assert st["step"].device.type == "cpu" and float(st["step"]) == 9.0  # torch keeps `step` on the CPU
    fused = torch.nn.Parameter(torch.empty(2, device="meta"))
    opt2 = torch.optim.AdamW([fused])
    opt2.param_groups[0]["fused"] = True  # fused / capturable AdamW keeps `step` on the parameter's device
    w2 = _Writer(SimpleNamespace(optimizer=opt2, zero_optimization_stage=lambda: 0), [["f"]], 9, 0)
    w2.moments(fused, {"exp_avg": torch.ones(2), "exp_avg_sq": torch.ones(2)})
    assert opt2.state[fused]["step"].device == fused.device

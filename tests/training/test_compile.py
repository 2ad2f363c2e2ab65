"""`training.compile`: torch.compile per transformer Block (megams.parallel.compile.apply_compile).

In-process: the tiny vanilla and bottom-up models train 3 AdamW steps compiled and eagerly from the
same seed and give the same losses (float tolerance); every block is compiled and blocks of the same
shape share one graph (Dynamo compiles once per block length, not once per block). Composition with
activation checkpointing: whole blocks inside the checkpoint wrapper (`full`), attention and MLP
inside their wrappers (`attention`). Through the trainer (`launch/pretrain.py`'s `main(argv)`): a
compiled run logs what it compiled and follows the eager run's loss curve.

The shapes (d_model 32, 2 heads, micro-batches of 2 x 64 tokens) are those of
tests/training/common.tiny_args, so the trainer's run reuses the in-process tests' compiled kernels
(Inductor's cache) and the first compile (15-25 s on a CPU) is paid once.
"""
import contextlib
import io
import math
import os

import pytest
import torch

from megams.config import load_config
from megams.models import build_model
from megams.models.layers import Block
from megams.parallel.checkpointing import apply_ac, is_checkpointed
from megams.parallel.compile import apply_compile, is_compiled
from megams.training.loss import lm_loss
from megams.training.trainer import main
from tests.training.common import ROOT, losses, tiny_args

SHAPE = ["model.d_model=32", "model.n_heads=2", "data.seq_len=64"]
BATCH = 2


def _cfg(model_type, *overrides):
    return load_config(os.path.join(ROOT, "configs", "tiny", f"{model_type}.yaml"), SHAPE + list(overrides))


def _train(cfg, steps=3):
    torch.manual_seed(cfg.training.seed)
    model = build_model(cfg.model, seed=cfg.training.seed)
    apply_ac(model, cfg)
    report = apply_compile(model, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, cfg.model.vocab_size, (BATCH, cfg.data.seq_len + 1), generator=g)
        loss = lm_loss(model(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(loss.item())
    return model, report, out


def _graphs():
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("model_type,blocks,graphs", [
    ("vanilla", 4, 1), ("bottom_up", 9, 3),
    # retina: split where its (eager, cached) index/mask plan is fetched; still not one per block
    pytest.param("retina", 4, 3, marks=pytest.mark.full)])
def test_compiled_blocks_train_like_eager(model_type, blocks, graphs):
    torch._dynamo.reset()  # graph counts below: nothing compiled by an earlier test
    _, _, eager = _train(_cfg(model_type))
    before = _graphs()
    model, report, compiled = _train(_cfg(model_type, "training.compile=true"))
    assert report.whole == blocks and report.compiled == blocks and not report.skipped
    assert all(is_compiled(b) for b in model.modules() if isinstance(b, Block))
    assert _graphs() - before == graphs  # one graph per block length (bottom-up: n, n/4, n/16), reused
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)
    assert all(math.isfinite(v) for v in compiled)


def test_compile_composes_with_activation_checkpointing():
    """full: the checkpoint wrapper stays outside the compiled block (same losses, still recomputed);
    attention: the block has a wrapped submodule, so attention and MLP are compiled inside theirs."""
    _, _, eager = _train(_cfg("vanilla"))
    model, report, compiled = _train(_cfg("vanilla", "training.compile=true",
                                          "parallel.activation_checkpointing.mode=full"))
    blocks = [b for b in model.modules() if isinstance(b, Block)]
    assert report.whole == len(blocks) == 4
    assert all(is_checkpointed(b) and is_compiled(b) for b in blocks)
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)

    cfg = _cfg("vanilla", "training.compile=true", "parallel.activation_checkpointing.mode=attention")
    model = build_model(cfg.model, seed=1)
    apply_ac(model, cfg)
    report = apply_compile(model, cfg)
    blocks = [b for b in model.modules() if isinstance(b, Block)]
    assert report.split == len(blocks) == 4 and report.whole == 0
    assert all(is_checkpointed(b.attn) and is_compiled(b.attn) and is_compiled(b.mlp) and not is_compiled(b)
               for b in blocks)
    assert "4 transformer blocks compiled" in report.describe()


def test_compile_refuses_zero3():
    from megams.config import ConfigError
    with pytest.raises(ConfigError, match="training.compile=true with parallel.zero_stage=3"):
        _cfg("vanilla", "training.compile=true", "parallel.zero_stage=3")   # at start-up, by the schema


def _run(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    return rc, out.getvalue()


def test_pretrain_with_training_compile(tmp_path):
    eager_dir, comp_dir = str(tmp_path / "eager"), str(tmp_path / "compiled")
    rc, out = _run(tiny_args("vanilla", eager_dir, steps=3))
    assert rc == 0 and "training.compile" not in out
    rc, out = _run(tiny_args("vanilla", comp_dir, steps=3, extra=["training.compile=true"]))
    assert rc == 0
    assert "[megams] training.compile: 4 transformer blocks compiled" in out
    a, b = losses(eager_dir), losses(comp_dir)
    assert len(b) == 3 and all(math.isfinite(v) for v in b)
    assert b == pytest.approx(a, rel=1e-4, abs=1e-5)


def _train_ranks(rank, world, argv):
    from megams.training.trainer import main as train_main
    return train_main(argv)


@pytest.mark.full
def test_compiled_tensor_and_pipeline_parallel_runs_follow_eager(tmp_path):
    """tp=2 (attention and MLP compiled inside the tensor-parallel wrappers, collectives eager) and
    pp=2 (each stage's blocks compiled, the other stage's left on meta), 2 ranks on gloo."""
    from tests.helpers.multiproc import run_ranks
    runs = {}
    for name, extra in (("tp", ["parallel.tensor=2"]), ("pp", ["parallel.pipeline=2"])):
        for comp in (False, True):
            d = str(tmp_path / f"{name}_{comp}")
            runs[(name, comp)] = (d, tiny_args("vanilla", d, steps=3,
                                               extra=extra + [f"training.compile={str(comp).lower()}"]))
    rcs = run_ranks(2, [(_train_ranks, (argv,)) for _, argv in runs.values()], timeout=500)
    assert all(rc == 0 for case in rcs for rc in case)
    for name in ("tp", "pp"):
        a, b = losses(runs[(name, False)][0]), losses(runs[(name, True)][0])
        assert len(b) == 3 and b == pytest.approx(a, rel=1e-4, abs=1e-5), name

"""Training checkpoints of every model and layout, made ONCE per test session and shared.

A case is (model, tp, pp, zero, precision); the default run trains a pairwise covering set of them
(every pair of values of every two factors appears in some case), `-m full` the full matrix. Each
case trains 2 steps with the real `main(argv)` in `run_ranks` processes (dp = 2 when tp = pp = 1,
else 1), then the same processes rebuild each run's layout, restore it with DeepSpeed's own
`load_checkpoint` and compute the TRAINING model's logits on fixed tokens. The checkpoints are then
converted (tools/convert_checkpoint.py) and the converted models loaded with torch alone in ONE fresh
subprocess that never imports deepspeed (`torch_only_logits`).
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import itertools
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, List

import pytest
import torch

from tests.checkpoint.ranks import train, training_logits
from tests.helpers.multiproc import run_ranks
from tests.training.common import ROOT, tiny_args

MODELS = ["vanilla", "bottom_up", "top_down", "retina"]
FACTORS = {"model": MODELS, "tp": [1, 2], "pp": [1, 2], "zero": [0, 1, 2, 3], "precision": ["fp32", "bf16"]}
VOCAB = 300  # not a multiple of 128: tensor parallelism pads it, conversion must crop it
STEPS = 2
TOKENS = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))


def tool(name: str):
    """tools/NAME.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"megams_tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def valid(c: dict) -> bool:
    if c["pp"] > 1 and c["zero"] > 1:
        return False  # DeepSpeed refuses ZeRO-2/3 with pipelines
    if c["pp"] > 1 and c["precision"] == "bf16" and c["zero"] == 0:
        return False  # pipeline + bf16 + ZeRO-0 cannot load_checkpoint (ENVIRONMENT.md): use ZeRO-1
    return True


def pairwise(factors: Dict[str, list]) -> List[dict]:
    """Greedy covering set of the valid combinations: every valid pair of values appears."""
    keys = list(factors)
    product = [c for c in (dict(zip(keys, v)) for v in itertools.product(*factors.values())) if valid(c)]

    def pairs(c):
        return {(a, c[a], b, c[b]) for i, a in enumerate(keys) for b in keys[i + 1:]}

    todo = set().union(*(pairs(c) for c in product))
    chosen = []
    while todo:
        best = max(product, key=lambda c: (len(pairs(c) & todo), -c["tp"] * c["pp"]))
        chosen.append(best)
        todo -= pairs(best)
    return chosen


def full_matrix() -> List[dict]:
    keys = list(FACTORS)
    return [c for c in (dict(zip(keys, v)) for v in itertools.product(*FACTORS.values())) if valid(c)]


def case_id(c: dict) -> str:
    return f"{c['model']}-tp{c['tp']}-pp{c['pp']}-z{c['zero']}-{c['precision']}"


def pipeline_in_trainer() -> bool:
    """The trainer refused parallel.pipeline > 1 until the pipeline strategy landed in it."""
    from megams.training import trainer
    return "parallel.pipeline > 1 is not available" not in inspect.getsource(trainer)


@dataclass
class Run:
    case: dict
    run_dir: str
    rc: int
    training_logits: torch.Tensor
    converted: str = ""
    convert_output: str = ""

    @property
    def ckpt(self) -> str:
        return os.path.join(self.run_dir, "checkpoints", f"step_{STEPS:08d}")

    @property
    def dp(self) -> int:
        return 2 if self.case["tp"] * self.case["pp"] == 1 else 1

    def val_loss(self) -> float:
        with open(os.path.join(self.run_dir, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f if "val_loss" in line][-1]["val_loss"]


def case_args(c: dict, run_dir: str, cache: str) -> list:
    extra = [f"model.vocab_size={VOCAB}", f"parallel.tensor={c['tp']}", f"parallel.pipeline={c['pp']}",
             f"parallel.zero_stage={c['zero']}", f"training.precision={c['precision']}",
             "training.eval_batches=1", f"data.cache_dir={cache}"]
    return tiny_args(c["model"], run_dir=run_dir, steps=STEPS, extra=extra)


def world_of(c: dict) -> int:
    return c["tp"] * c["pp"] * (2 if c["tp"] * c["pp"] == 1 else 1)


def build_runs(cases: List[dict], tmp) -> Dict[str, Run]:
    """Train every case (grouped by world size), get its training logits, convert it."""
    cache = str(tmp / "cache")
    if not pipeline_in_trainer():
        cases = [c for c in cases if c["pp"] == 1]
    runs: Dict[str, Run] = {}
    for world in sorted({world_of(c) for c in cases}):
        group = [c for c in cases if world_of(c) == world]
        dirs = [str(tmp / case_id(c)) for c in group]
        jobs = [(train, (case_args(c, d, cache),)) for c, d in zip(group, dirs)]
        jobs += [(training_logits, (os.path.join(d, "checkpoints", f"step_{STEPS:08d}"), TOKENS)) for d in dirs]
        out = run_ranks(world, jobs, timeout=900, env={"OMP_NUM_THREADS": "1"})
        for i, (c, d) in enumerate(zip(group, dirs)):
            logits = next(x for x in out[len(group) + i] if x is not None)  # the last pipeline stage's
            runs[case_id(c)] = Run(c, d, max(out[i]), logits)
    convert = tool("convert_checkpoint").main
    for name, run in runs.items():
        run.converted = str(tmp / "converted" / name)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = convert([run.ckpt, run.converted, "--weights", "pt" if run.case["zero"] == 2 else "safetensors"])
        assert rc == 0, buf.getvalue()
        run.convert_output = buf.getvalue()
    return runs


TORCH_ONLY = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from megams import load_pretrained
tokens = torch.load(sys.argv[3], weights_only=True)
out = {}
for name, path in json.loads(sys.argv[2]).items():
    model = load_pretrained(path)
    with torch.no_grad():
        out[name] = {"fp32": model(tokens), "bf16": model.to(torch.bfloat16)(tokens).float(),
                     "eval": not model.training}
out["__deepspeed_imported__"] = "deepspeed" in sys.modules
out["__megams_modules__"] = sorted(m for m in sys.modules
                                   if m.startswith(("deepspeed", "megams.training", "megams.parallel")))
torch.save(out, sys.argv[4])
"""


def torch_only_logits(runs: Dict[str, Run], tmp) -> dict:
    """Load every converted model in ONE fresh interpreter with torch alone; its logits on TOKENS."""
    tok, result = str(tmp / "tokens.pt"), str(tmp / "torch_only.pt")
    torch.save(TOKENS, tok)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    paths = json.dumps({n: r.converted for n, r in runs.items()})
    proc = subprocess.run([sys.executable, "-c", TORCH_ONLY, ROOT, paths, tok, result], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return torch.load(result, weights_only=True)


@pytest.fixture(scope="session")
def default_runs(tmp_path_factory):
    return build_runs(pairwise(FACTORS), tmp_path_factory.mktemp("ckpt-default"))


@pytest.fixture(scope="session")
def default_torch_only(default_runs, tmp_path_factory):
    return torch_only_logits(default_runs, tmp_path_factory.mktemp("torch-only-default"))


@pytest.fixture(scope="session")
def full_runs(tmp_path_factory):
    return build_runs(full_matrix(), tmp_path_factory.mktemp("ckpt-full"))


@pytest.fixture(scope="session")
def full_torch_only(full_runs, tmp_path_factory):
    return torch_only_logits(full_runs, tmp_path_factory.mktemp("torch-only-full"))

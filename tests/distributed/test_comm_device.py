"""Every collective on a tensor goes through megams.distributed.comm, which puts control tensors on
the device the backend serves and refuses a tensor it would not take (NCCL: no CPU tensors)."""
import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megams.distributed import comm

ROOT = Path(__file__).resolve().parents[2]
# torch.distributed's collectives on tensors (the `*_object` ones pick their device themselves)
TENSOR_COLLECTIVES = {"all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_single",
                      "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "send", "recv",
                      "isend", "irecv", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single",
                      "_all_gather_base", "_reduce_scatter_base"}


def direct_collectives(source: str) -> list:
    """(line, call) of every torch.distributed tensor collective called in `source`."""
    tree = ast.parse(source)
    aliases, direct = set(), set()  # names bound to torch.distributed / to one of its collectives
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in ("torch.distributed", "torch.distributed.distributed_c10d") and a.asname:
                    aliases.add(a.asname)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if node.module == "torch" and a.name == "distributed":
                    aliases.add(a.asname or a.name)
                elif node.module.startswith("torch.distributed") and a.name in TENSOR_COLLECTIVES:
                    direct.add(a.asname or a.name)
                elif node.module == "torch.distributed" and a.name == "distributed_c10d":
                    aliases.add(a.asname or a.name)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in direct:
            found.append((node.lineno, f.id))
        elif isinstance(f, ast.Attribute) and f.attr in TENSOR_COLLECTIVES:
            base = ast.unparse(f.value)
            if base in aliases or base in ("torch.distributed", "torch.distributed.distributed_c10d"):
                found.append((node.lineno, f"{base}.{f.attr}"))
    return found


def test_detector_finds_every_spelling():
    src = textwrap.dedent("""
        import torch.distributed as dist
        import torch
        from torch import distributed as d2
        from torch.distributed import all_gather as ag
        dist.all_reduce(x)
        torch.distributed.broadcast(x, 0)
        d2.reduce_scatter_tensor(o, x)
        ag(parts, x)
        dist.all_gather_object(out, obj)   # objects: out of scope
        comm.all_reduce(x)                 # the helper: fine
    """)
    assert [c for _, c in direct_collectives(src)] == ["dist.all_reduce", "torch.distributed.broadcast",
                                                       "d2.reduce_scatter_tensor", "ag"]


def test_no_module_calls_torch_distributed_collectives_directly():
    offenders = []
    for path in sorted((ROOT / "megams").rglob("*.py")):
        if path == ROOT / "megams" / "distributed" / "comm.py":
            continue
        for line, call in direct_collectives(path.read_text()):
            offenders.append(f"{path.relative_to(ROOT)}:{line}: {call}")
    assert not offenders, ("call megams.distributed.comm instead (it checks the tensor's device):\n"
                           + "\n".join(offenders))


@pytest.mark.parametrize("name, takes_cpu", [("gloo", True), ("nccl", False), ("cpu:gloo,cuda:nccl", True),
                                             ("cuda:gloo", False), ("cuda:nccl", False)])
def test_name_takes_cpu(name, takes_cpu):
    assert comm.name_takes_cpu(name) is takes_cpu


_RUNTIME = r'''
import os, sys, tempfile, warnings
warnings.filterwarnings("ignore", category=FutureWarning)
import torch, torch.distributed as dist
from megams.distributed import comm
assert comm.backend_takes_cpu() and comm.comm_device() == torch.device("cpu")  # no group yet: CPU
for backend in sys.argv[1:]:
  print("== " + backend)
  dist.init_process_group(backend, init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
  print("takes_cpu", comm.backend_takes_cpu())
  print("device", comm.comm_device().type)
  t = torch.ones(2)
  try:
      dist.all_reduce(t)
      print("raw ok")
  except RuntimeError as e:
      print("raw refused:", str(e).splitlines()[0])
  try:
      comm.all_reduce(t)
      print("comm ok", t.tolist())
  except comm.CollectiveDeviceError as e:
      print("comm refused:", e)
  dist.destroy_process_group()
'''


BACKENDS = ["cuda:gloo", "gloo", "cpu:gloo,cuda:gloo"]


@pytest.fixture(scope="module")
def runtime() -> dict:
    """backend -> what the script printed with a real one-rank group of it (one subprocess for all)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", _RUNTIME, *BACKENDS], capture_output=True, text=True, env=env,
                       timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    parts = p.stdout.split("== ")[1:]
    return {part.split("\n", 1)[0]: part.split("\n", 1)[1] for part in parts}


def test_cuda_only_backend_refuses_cpu_tensors_like_nccl(runtime):
    """A real "cuda:gloo" group (on this CPU machine) refuses CPU tensors exactly as NCCL does;
    comm answers cuda and refuses the tensor itself, naming the call and the backend."""
    out = runtime["cuda:gloo"]
    assert "takes_cpu False" in out and "device cuda" in out
    assert "raw refused: No backend type associated with device type cpu" in out
    assert ("comm refused: all_reduce: tensor on cpu, but backend 'cuda:gloo' only reduces cuda tensors"
            in out), out


@pytest.mark.parametrize("backend", ["gloo", "cpu:gloo,cuda:gloo"])
def test_cpu_backends_take_cpu_tensors(runtime, backend):
    out = runtime[backend]
    assert "takes_cpu True" in out and "device cpu" in out
    assert "raw ok" in out and "comm ok [1.0, 1.0]" in out

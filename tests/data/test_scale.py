"""The data path at scale: opening, windows, shuffle and bits-per-byte lookups cost the same for 1,000 and
for millions of documents. The trainer's peak RSS (ru_maxrss of a 2-step `launch/pretrain.py` run, one
rank, in a fresh process) on a dataset of 2M documents is within 150 MB of the same run on 1,000
documents; `-m full` runs the issue's 20M documents (numbers in docs/DATA.md)."""
import json
import os
import subprocess
import sys
import time

import pytest

from tests.data.synthetic import ROOT_DIR, write_megams, write_megatron
from tests.training.common import tiny_args

_CHILD = """
import json, resource, sys
from megams.training.trainer import main
rc = main(sys.argv[1:])
print("RESULT " + json.dumps({"rc": rc, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def peak_rss_of_run(prefix, run_dir, cache_dir, code_dir=ROOT_DIR):
    """ru_maxrss (MB) of a 2-step single-rank training run (with one evaluation) on `prefix`, with the megams
    package of `code_dir` (another checkout: to compare with older code)."""
    argv = tiny_args("vanilla", run_dir, steps=2, extra=[
        f"data.path={prefix}", f"data.cache_dir={cache_dir}", "training.eval_interval=2", "checkpoint.interval=0"])
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::FutureWarning",
               PYTHONPATH=os.pathsep.join(dict.fromkeys([code_dir, ROOT_DIR])))
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT_DIR, ".venv", "torch_extensions"))
    out = subprocess.run([sys.executable, "-c", _CHILD, *argv], capture_output=True, text=True, env=env,
                         timeout=300, cwd=code_dir)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, out.stdout[-2000:] + out.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["rc"] == 0, out.stderr[-4000:]
    return result["maxrss_mb"]


def _compare(tmp_path, n_docs, writer=write_megams):
    small, large = str(tmp_path / "small"), str(tmp_path / "large")
    writer(small, 1000, doc_len=64)
    t = time.perf_counter()
    writer(large, n_docs, doc_len=64 if n_docs <= 2_000_000 else 8)
    written = time.perf_counter() - t
    rss = [peak_rss_of_run(p, str(tmp_path / f"run-{i}"), str(tmp_path / "cache")) for i, p in enumerate((small, large))]
    print(f"\n[scale] {n_docs:,} documents (.idx {os.path.getsize(large + '.idx') / 2**20:.0f} MB, .bin "
          f"{os.path.getsize(large + '.bin') / 2**20:.0f} MB, written in {written:.1f} s): peak RSS {rss[1]:.0f} MB "
          f"vs {rss[0]:.0f} MB on 1,000 documents")
    assert rss[1] - rss[0] < 150, rss
    return rss


def test_peak_rss_does_not_grow_with_documents(tmp_path):
    _compare(tmp_path, 2_000_000)


@pytest.mark.full
def test_peak_rss_20m_documents(tmp_path):
    _compare(tmp_path, 20_000_000)


@pytest.mark.full
def test_peak_rss_20m_documents_megatron(tmp_path):
    _compare(tmp_path, 20_000_000, write_megatron)


def test_lookups_do_not_read_the_index(tmp_path):
    """Opening and the per-window source bytes touch O(log n) pages: about the same cost at 1,000 and 2M
    documents. (Each page touched in a memory map can map a whole page-cache folio, up to 2 MB on recent
    kernels: tens of MB for these lookups, whatever the size of the index.)"""
    from tests.data.synthetic import open_cost
    import megams.data.batches  # noqa: F401  (imports outside the measurement)
    costs = {}
    for n in (1000, 2_000_000):
        write_megams(str(tmp_path / f"ds{n}"), n, doc_len=16)
        open_cost(str(tmp_path / f"ds{n}"), seq_len=64)  # warm up numpy's first-call allocations
        costs[n] = open_cost(str(tmp_path / f"ds{n}"), seq_len=64)
    idx_mb = os.path.getsize(tmp_path / "ds2000000.idx") / 2**20
    big = costs[2_000_000]
    assert big["open_s"] < 0.05 and big["eval_64_windows_s"] < 0.5, big
    assert big["rss_added_mb"] < costs[1000]["rss_added_mb"] + 48, (big, costs[1000], idx_mb)
    assert big["bytes_per_token"] == pytest.approx(15 / 16, rel=1e-3)  # one eod in 16 tokens

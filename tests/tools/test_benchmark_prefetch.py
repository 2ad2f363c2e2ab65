"""tools/benchmark.py prefetch: both depths measured on the same batches, a table and JSON written."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))


def test_prefetch_study_toy(tmp_path, capsys):
    import benchmark
    out = tmp_path / "pf"
    rc = benchmark.main(["prefetch", "--out", str(out), "--steps", "2", "--rounds", "2", "--threads", "1",
                         "--set", "data.seq_len=32", "--set", "training.global_batch_size=4",
                         "--set", "training.micro_batch_size=2",
                         "--set", f"data.cache_dir={tmp_path / 'cache'}"])
    assert rc == 0
    rep = json.loads((out / "prefetch.json").read_text())
    assert [r["prefetch"] for r in rep["rows"]] == [0, 2]
    assert all(len(r["rounds"]) == 2 and r["tokens_per_s"] > 0 for r in rep["rows"])
    assert rep["rows"][0]["vs_off"] == 1.0 and rep["tokens_per_step"] == 4 * 32
    table = (out / "prefetch.md").read_text()
    assert "| data.prefetch | tokens/s (median) | vs off | per round |" in table and "| 2 |" in table

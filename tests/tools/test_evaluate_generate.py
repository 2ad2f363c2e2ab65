"""tools/evaluate.py and tools/generate.py on a saved model (no training needed: save_model)."""
import contextlib
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F

from megams.checkpoint import save_model
from megams.inference.evaluation import windows
from megams.models import build_model
from tests.checkpoint.conftest import tool
from tests.models.cases import tiny

TEXT = "def f(x):\n    return x + 1\n\nThe quick brown fox jumps over the lazy dog.\n" * 6


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("tools")
    model = build_model(tiny("bottom_up", vocab_size=256, max_seq_len=256), seed=5).eval()
    save_model(model, str(d / "m"))
    (d / "text.txt").write_text(TEXT)
    return model, str(d / "m"), str(d / "text.txt")


def _run(name, argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = tool(name).main(argv)
    return rc, buf.getvalue()


def _scored(plan):
    return [t for s, n, skip in plan for t in range(s + 1 + skip, s + n + 1)]


def test_sliding_windows_score_every_target_once():
    assert windows(0, 10, 4, 4) == [(0, 4, 0), (4, 4, 0), (8, 1, 0)]
    assert _scored(windows(0, 10, 4, 2)) == list(range(1, 10))             # overlapping: each target once
    assert windows(0, 10, 4, 2)[1] == (2, 4, 2)                             # ... with >= 2 tokens of context
    assert _scored(windows(0, 10, 4, 5)) == [1, 2, 3, 4, 6, 7, 8, 9]         # training's windows of seq_len+1
    assert len(windows(0, 100, 4, 4, max_windows=3)) == 3


@pytest.mark.parametrize("stride", [8, 16])
def test_evaluate_matches_a_direct_computation(saved, stride, tmp_path):
    model, path, text = saved
    rc, out = _run("evaluate", [path, "--data", text, "--seq-len", "16", "--stride", str(stride)])
    assert rc == 0
    res = json.loads(out)
    from megams.inference.evaluation import open_stream
    ds = open_stream(text, "byte", str(tmp_path))  # the tokenization itself is tested in tests/data
    ids = torch.from_numpy(ds.tokens[:].astype("int64"))
    nll, n = 0.0, 0
    with torch.no_grad():
        for s, length, skip in windows(0, len(ids), 16, stride):
            logits = model(ids[None, s:s + length])[0]
            losses = F.cross_entropy(logits, ids[s + 1:s + length + 1], reduction="none")
            nll, n = nll + losses[skip:].double().sum().item(), n + length - skip
    assert res["scored_tokens"] == n == len(ids) - 1
    assert res["loss"] == pytest.approx(nll / n, rel=1e-6)
    assert res["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-6)
    first, end = ds.source_bytes_before([1, ds.n_tokens])  # the bytes the targets (tokens 1..) stand for
    assert res["bits_per_byte"] == pytest.approx(nll / math.log(2) / (end - first), rel=1e-6)


def test_evaluate_refuses_missing_data(saved, tmp_path, capsys):
    _, path, _ = saved
    assert tool("evaluate").main([path, "--data", str(tmp_path / "nope.txt")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}/nope.txt: ")


def test_generate_samples_reproducibly(saved):
    _, path, _ = saved
    argv = [path, "--prompt", "def f(", "--max-new-tokens", "12", "--temperature", "0.7", "--top-k", "40",
            "--top-p", "0.9", "--seed", "3", "--json", "--num-samples", "2"]
    rc, out = _run("generate", argv)
    rc2, out2 = _run("generate", argv)
    a, b = json.loads(out), json.loads(out2)
    assert rc == rc2 == 0 and a["samples"] == b["samples"] and len(a["samples"]) == 2
    assert a["new_tokens"] == 24 and a["tokens_per_s"] > 0
    rc, greedy = _run("generate", [path, "--prompt", "def f(", "--max-new-tokens", "8", "--temperature", "0",
                                   "--json"])
    rc, recompute = _run("generate", [path, "--prompt", "def f(", "--max-new-tokens", "8", "--temperature", "0",
                                      "--json", "--no-cache"])
    assert json.loads(greedy)["samples"] == json.loads(recompute)["samples"]


def test_generate_benchmark_reports_both_paths(saved):
    _, path, _ = saved
    rc, out = _run("generate", [path, "--benchmark", "--max-new-tokens", "4", "--prompt", "abc"])
    res = json.loads(out)
    assert rc == 0 and res["type"] == "bottom_up" and res["cached"]["tokens_per_s"] > 0
    assert res["recompute"]["new_tokens"] == 4

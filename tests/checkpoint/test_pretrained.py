"""The plain-torch model directory on its own (no training): save, load, lazy import, torch-only loading."""
import json
import os
import subprocess
import sys

import pytest
import torch

from megams.checkpoint import load_pretrained, read_config, save_model
from megams.models import build_model
from tests.models.cases import tiny
from tests.training.common import ROOT


@pytest.mark.parametrize("model_type,over,weights", [
    ("vanilla", {"tie_embeddings": False, "positions": "learned"}, "pt"),
    ("bottom_up", {"pooling": "attention", "upsampling": "attention", "shift_pad": "learned"}, "safetensors"),
    ("top_down", {"n_pre": 1}, "safetensors"),
    ("retina", {}, "pt"),
])
def test_save_and_load_every_model(tmp_path, model_type, over, weights):
    model = build_model(tiny(model_type, **over), seed=3).eval()
    files = save_model(model, str(tmp_path / "m"), weights=weights)
    assert sorted(os.path.basename(f) for f in files) == sorted(
        [f"model.{weights}", "config.json", "tokenizer.json", "export.json", "README.md"])
    loaded = load_pretrained(str(tmp_path / "m"))
    assert not loaded.training and loaded.tokenizer.name == "byte" and read_config(str(tmp_path / "m")) == model.cfg
    x = torch.randint(0, 64, (2, 19))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    if model.cfg.tie_embeddings:
        assert loaded.head.weight is loaded.embed.weight
    bf16 = load_pretrained(str(tmp_path / "m"), dtype=torch.bfloat16)
    assert bf16.embed.weight.dtype == torch.bfloat16


def test_sentencepiece_tokenizer_travels_with_the_model(tmp_path):
    from megams.data.tokenizers import train_sentencepiece
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x + 1\n\nThe quick brown fox jumps over the lazy dog.\n" * 200)
    spm = train_sentencepiece([str(text)], str(tmp_path / "sp"), vocab_size=320)
    model = build_model(tiny("vanilla", vocab_size=320), seed=0)
    save_model(model, str(tmp_path / "m"), tokenizer=spm)
    info = json.load(open(tmp_path / "m" / "tokenizer.json"))
    assert info["type"] == "sentencepiece" and os.path.isfile(tmp_path / "m" / "tokenizer.model")
    tok = load_pretrained(str(tmp_path / "m")).tokenizer
    assert tok.fingerprint == info["fingerprint"] and tok.decode(tok.encode("def f(x):")) == "def f(x):"


def test_import_megams_is_cheap_and_load_pretrained_never_imports_deepspeed(tmp_path):
    save_model(build_model(tiny("top_down"), seed=0), str(tmp_path / "m"))
    code = f"""
import sys
import megams
assert "torch" not in sys.modules, "import megams must stay cheap"
from megams import load_pretrained
model = load_pretrained({str(tmp_path / 'm')!r})
import torch
print(model(torch.zeros(1, 8, dtype=torch.long)).shape[-1])
bad = sorted(m for m in sys.modules if m.startswith(("deepspeed", "megams.training", "megams.parallel")))
assert not bad, bad
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "64"

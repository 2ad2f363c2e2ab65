"""The plain-torch model directory: what `tools/convert_checkpoint.py` writes and `load_pretrained` reads.

    OUTPUT_DIR/
      config.json         the model config (megams.config.schema.ModelConfig fields)
      model.safetensors   fp32 weights under the plain model's names (or model.pt, a dict of tensors);
                          tied weights once (the LM head shares embed.weight)
      tokenizer.json      {"type": "byte"} or {"type": "sentencepiece", "file": "tokenizer.model", ...}
      tokenizer.model     the sentencepiece model, copied (sentencepiece tokenizers only)
      export.json         where it came from: checkpoint, step, layout, training data settings
      README.md           the same, for people

Loading needs torch (+ safetensors for .safetensors) and megams.models, and never deepspeed; nothing
is unpickled but tensors (`safetensors`, or `torch.load(weights_only=True)`).

    from megams import load_pretrained
    model = load_pretrained("exported/")          # eval mode, on cpu, fp32
    ids = model.tokenizer.encode("def f(x):")
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import torch

from megams.checkpoint.errors import CheckpointError

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
EXPORT_FILE = "export.json"
WEIGHT_FILES = ("model.safetensors", "model.pt")
EXPORT_FORMAT = "megams-pretrained/1"


def weights_file(path: str) -> Optional[str]:
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    return None


def is_pretrained_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and weights_file(path) is not None


def _json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_config(path: str):
    """The ModelConfig of a model directory."""
    from megams.config.loader import format_validation_error
    from megams.config.schema import ModelConfig
    from pydantic import ValidationError
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: not a megams model directory (no {CONFIG_FILE}; convert a training "
                              "checkpoint with tools/convert_checkpoint.py)")
    try:
        return ModelConfig.model_validate(_json(cfg_path))
    except ValidationError as e:
        raise CheckpointError(format_validation_error(e, cfg_path)) from None


def read_weights(path: str) -> Tuple[Dict[str, torch.Tensor], str]:
    """(tensors, file) of a model directory: safetensors, or a .pt dict of tensors (weights_only)."""
    f = weights_file(path)
    if f is None:
        raise CheckpointError(f"{path}: no weights ({' or '.join(WEIGHT_FILES)})")
    try:
        if f.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(f, device="cpu"), f
        sd = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors raises its own error types; torch raises RuntimeError / UnpicklingError
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{f}: truncated or corrupted weights file ({detail})") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise CheckpointError(f"{f}: expected a dict of named tensors")
    return sd, f


def load_tokenizer(path: str):
    """The tokenizer saved with a model directory (megams.data.tokenizers: byte or sentencepiece)."""
    from megams.data.tokenizers import ByteTokenizer, SentencePieceTokenizer
    tok_path = os.path.join(path, TOKENIZER_FILE)
    spec = _json(tok_path) if os.path.isfile(tok_path) else {"type": "byte"}
    if spec.get("type") == "byte":
        return ByteTokenizer()
    if spec.get("type") == "sentencepiece":
        return SentencePieceTokenizer(os.path.join(path, spec.get("file", "tokenizer.model")))
    raise CheckpointError(f"{tok_path}: unknown tokenizer type {spec.get('type')!r} (expected byte or sentencepiece)")


def load_state(model: torch.nn.Module, tensors: Dict[str, torch.Tensor], where: str) -> None:
    """Copy `tensors` into `model` by name; tied aliases (the LM head) may be absent. Exact names and shapes."""
    from megams.checkpoint.layout import tied_parameters
    aliases = set(tied_parameters(model))
    own = {n: t for n, t in model.state_dict().items() if n not in aliases}
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own) - aliases)
    if missing or unexpected:
        def some(names):
            return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
        parts = ([f"missing {some(missing)}"] if missing else []) + ([f"unexpected {some(unexpected)}"] if unexpected else [])
        hint = ""
        if missing and all(".merge." in n for n in missing):
            hint = (" -- weights saved before model.scale_merge existed (or with scale_merge: none): set "
                    "\"scale_merge\": \"none\" in its config.json to load them as they were trained")
        raise CheckpointError(f"{where}: weights do not match the model of config.json ({'; '.join(parts)}){hint}")
    for n, t in own.items():
        if tuple(tensors[n].shape) != tuple(t.shape):
            raise CheckpointError(f"{where}: {n} has shape {list(tensors[n].shape)}, the model expects {list(t.shape)}")
    with torch.no_grad():
        for n, t in own.items():
            t.copy_(tensors[n])


def load_pretrained(path: str, device: str = "cpu", dtype: Optional[torch.dtype] = None,
                    tokenizer: bool = True) -> torch.nn.Module:
    """A plain-torch megams model directory -> the model, in eval mode, with `.tokenizer` (and `.cfg`).

    Only torch, safetensors and megams.models are used (no deepspeed import); only tensors are read."""
    from megams.models import build_model
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such directory")
    cfg = read_config(path)
    tensors, f = read_weights(path)
    model = build_model(cfg, device="meta").to_empty(device="cpu")
    model.tie_weights()
    load_state(model, tensors, f)
    if dtype is not None:
        model = model.to(dtype)
    model = model.to(device).eval()
    model.tokenizer = load_tokenizer(path) if tokenizer else None
    model.pretrained_path = os.path.abspath(path)
    return model

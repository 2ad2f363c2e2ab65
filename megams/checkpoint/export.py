"""Write a plain-torch model directory (layout: see pretrained.py): from a training checkpoint
(`export_pretrained`), from full tensors (`save_pretrained`) or from a plain model (`save_model`)."""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List, Optional

import torch

from megams.checkpoint.errors import CheckpointError
from megams.checkpoint.pretrained import CONFIG_FILE, EXPORT_FILE, EXPORT_FORMAT, TOKENIZER_FILE
from megams.checkpoint.reader import TrainingState

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _tokenizer_files(spec: str, fingerprint: Optional[str], tmp: str) -> List[str]:
    """tokenizer.json (+ a copy of the sentencepiece model), checked against the training fingerprint."""
    from megams.data.errors import DataError
    from megams.data.tokenizers import load_tokenizer
    if spec == "byte":
        info = {"type": "byte", "fingerprint": "byte"}
        written = []
    else:
        try:
            tok = load_tokenizer(spec)
        except DataError as e:
            raise CheckpointError(f"tokenizer of the training run: {e}") from None
        if fingerprint and tok.fingerprint != fingerprint:
            raise CheckpointError(f"{spec}: this sentencepiece model is not the one the run trained with "
                                  f"(fingerprint {tok.fingerprint[:26]}..., the checkpoint has {fingerprint[:26]}...)")
        shutil.copyfile(spec, os.path.join(tmp, "tokenizer.model"))
        info = {"type": "sentencepiece", "file": "tokenizer.model", "fingerprint": tok.fingerprint,
                "vocab_size": tok.vocab_size, "eod_id": tok.eod_id}
        written = ["tokenizer.model"]
    with open(os.path.join(tmp, TOKENIZER_FILE), "w") as f:
        json.dump(info, f, indent=1)
    return [TOKENIZER_FILE] + written


def _validation(ckpt: str, step: int) -> Optional[dict]:
    """The run's evaluation record at `step` (metrics.jsonl next to checkpoints/), if there is one."""
    path = os.path.join(os.path.dirname(os.path.dirname(ckpt)), "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    found = None
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step") == step and "val_loss" in rec:
                found = {k: rec[k] for k in ("val_loss", "val_ppl", "val_bpb") if k in rec}
    return found


def _readme(info: dict, weights: str) -> str:
    src = info.get("source")
    if src:
        lay = src["layout"]
        origin = (f"Exported by `tools/convert_checkpoint.py` from `{src['checkpoint']}`\n(training step "
                  f"{src['step']}; layout dp={lay['dp']} tp={lay.get('tp', 1)} pp={lay.get('pp', 1)} "
                  f"zero_stage={lay['zero_stage']} precision={lay['precision']}).")
    else:
        origin = "Saved with `megams.checkpoint.save_pretrained`."
    val = info.get("validation")
    if val:
        origin += f"\nValidation loss at that step: {val['val_loss']:.4f}."
    return f"""# megams {info['model']['type']} language model (plain torch)

{origin}

- `{CONFIG_FILE}`: the model config
- `{weights}`: {info['weights']['dtype']} weights, {info['weights']['parameters']:,} parameters (tied weights once)
- `{TOKENIZER_FILE}`: the tokenizer ({info['tokenizer']}); `{EXPORT_FILE}`: where this came from

```python
from megams import load_pretrained          # torch + safetensors only, never deepspeed
model = load_pretrained("{os.path.basename(info['output'])}")   # eval mode; model.tokenizer
logits = model(tokens)                      # tokens: LongTensor [B, T] -> [B, T, vocab]
```
Evaluate with `tools/evaluate.py`, sample with `tools/generate.py` (see docs/CHECKPOINTS.md).
"""


def save_pretrained(params: Dict[str, torch.Tensor], model_config: dict, output_dir: str, weights: str = "safetensors",
                    dtype: str = "fp32", tokenizer: str = "byte", fingerprint: Optional[str] = None,
                    info: Optional[dict] = None) -> List[str]:
    """Write a model directory (must not exist, or be empty) atomically from full plain tensors
    (tied aliases once). Returns the files written."""
    if weights not in ("safetensors", "pt"):
        raise CheckpointError(f"weights format {weights!r}: expected safetensors or pt")
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise CheckpointError(f"{output_dir}: already exists and is not empty (choose a new output directory)")
    os.makedirs(os.path.dirname(output_dir), exist_ok=True)
    tmp = f"{output_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        tensors = {n: t.detach().to("cpu", DTYPES[dtype]).contiguous() for n, t in params.items()}
        name = "model.safetensors" if weights == "safetensors" else "model.pt"
        if weights == "safetensors":
            from safetensors.torch import save_file
            save_file(tensors, os.path.join(tmp, name), metadata={"format": "pt", "megams": EXPORT_FORMAT})
        else:
            torch.save(tensors, os.path.join(tmp, name))
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(model_config, f, indent=1)
        written = [name, CONFIG_FILE] + _tokenizer_files(tokenizer, fingerprint, tmp)
        info = {"format": EXPORT_FORMAT, "output": output_dir, "model": model_config,
                "weights": {"file": name, "dtype": dtype, "parameters": sum(t.numel() for t in tensors.values())},
                "tokenizer": "byte" if tokenizer == "byte" else f"sentencepiece {os.path.basename(tokenizer)}",
                **(info or {})}
        with open(os.path.join(tmp, EXPORT_FILE), "w") as f:
            json.dump(info, f, indent=1)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(_readme(info, name))
        written += [EXPORT_FILE, "README.md"]
        if os.path.isdir(output_dir):
            os.rmdir(output_dir)  # empty (checked above)
        os.replace(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [os.path.join(output_dir, w) for w in written]


def save_model(model: torch.nn.Module, output_dir: str, tokenizer: str = "byte", **kwargs) -> List[str]:
    """A plain megams model (megams.models) -> a model directory."""
    return save_pretrained(dict(model.named_parameters()), model.cfg.model_dump(mode="json"), output_dir,
                           tokenizer=tokenizer, **kwargs)


def export_pretrained(state: TrainingState, output_dir: str, weights: str = "safetensors", dtype: str = "fp32",
                      tokenizer: Optional[str] = None) -> List[str]:
    """A training checkpoint read by `read_checkpoint` -> a model directory (see pretrained.py)."""
    cfg = state.meta["config"]
    spec = tokenizer or cfg["data"]["tokenizer"]
    info = {"source": {"checkpoint": state.path, "step": state.step, "layout": state.layout,
                       "files": [os.path.basename(p) for p in state.files]},
            "training": {"data": cfg["data"], "seed": cfg["training"]["seed"],
                         "precision": cfg["training"]["precision"]},
            "validation": _validation(state.path, state.step)}
    return save_pretrained(state.params, state.model_config, output_dir, weights, dtype, spec,
                           None if tokenizer else state.meta.get("tokenizer"), info)

"""Write a plain-torch model directory (see pretrained.py for the layout) from a training checkpoint."""
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
    lay = info["source"]["layout"]
    val = info.get("validation")
    return f"""# megams {info['model']['type']} language model (plain torch)

Exported by `tools/convert_checkpoint.py` from `{info['source']['checkpoint']}` (training step
{info['source']['step']}; layout dp={lay['dp']} tp={lay.get('tp', 1)} pp={lay.get('pp', 1)}
zero_stage={lay['zero_stage']} precision={lay['precision']}).
{f"Validation loss at that step: {val['val_loss']:.4f}." if val else ""}

- `{CONFIG_FILE}`: the model config; `{weights}`: {info['weights']['dtype']} weights, {info['weights']['parameters']:,}
  parameters (tied weights stored once); `{TOKENIZER_FILE}`: the tokenizer ({info['tokenizer']}).

```python
from megams import load_pretrained          # torch only, no deepspeed
model = load_pretrained("{os.path.basename(info['output'])}")
logits = model(tokens)                      # tokens: LongTensor [B, T]
```
Evaluate with `tools/evaluate.py`, sample with `tools/generate.py`.
"""


def export_pretrained(state: TrainingState, output_dir: str, weights: str = "safetensors", dtype: str = "fp32",
                      tokenizer: Optional[str] = None) -> List[str]:
    """Write `output_dir` (must not exist, or be empty) atomically. Returns the files written."""
    if weights not in ("safetensors", "pt"):
        raise CheckpointError(f"weights format {weights!r}: expected safetensors or pt")
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise CheckpointError(f"{output_dir}: already exists and is not empty (choose a new output directory)")
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{output_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        tensors: Dict[str, torch.Tensor] = {n: t.to(DTYPES[dtype]).contiguous() for n, t in state.params.items()}
        name = "model.safetensors" if weights == "safetensors" else "model.pt"
        if weights == "safetensors":
            from safetensors.torch import save_file
            save_file(tensors, os.path.join(tmp, name), metadata={"format": "pt", "megams": EXPORT_FORMAT})
        else:
            torch.save(tensors, os.path.join(tmp, name))
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(state.model_config, f, indent=1)
        spec = tokenizer or state.meta["config"]["data"]["tokenizer"]
        written = [name, CONFIG_FILE] + _tokenizer_files(spec, None if tokenizer else state.meta.get("tokenizer"), tmp)
        cfg = state.meta["config"]
        info = {"format": EXPORT_FORMAT, "output": output_dir, "model": state.model_config,
                "weights": {"file": name, "dtype": dtype, "parameters": sum(t.numel() for t in tensors.values())},
                "tokenizer": "byte" if spec == "byte" else f"sentencepiece {os.path.basename(spec)}",
                "source": {"checkpoint": state.path, "step": state.step, "layout": state.layout,
                           "files": [os.path.basename(p) for p in state.files]},
                "training": {"data": cfg["data"], "seed": cfg["training"]["seed"],
                             "precision": cfg["training"]["precision"]},
                "validation": _validation(state.path, state.step)}
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

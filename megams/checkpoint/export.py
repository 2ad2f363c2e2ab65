"""Write a plain-torch model directory (layout: see pretrained.py): from a training checkpoint, streamed
tensor by tensor (`export_checkpoint`, what tools/convert_checkpoint.py runs) or already read
(`export_pretrained`), from full tensors (`save_pretrained`) or from a plain model (`save_model`)."""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
from typing import Callable, Dict, List, Optional, Tuple

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


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16"}


def write_safetensors(path: str, shapes: Dict[str, List[int]], fetch: Callable[[str], torch.Tensor],
                      dtype: torch.dtype, metadata: Optional[Dict[str, str]] = None) -> None:
    """A .safetensors file written tensor by tensor: the header (names, shapes, offsets) first, then
    each tensor as `fetch(name)` returns it, so at most one tensor is in memory. Same bytes layout as
    safetensors' own writer (8-byte little-endian header size, JSON header padded to 8 bytes)."""
    names = sorted(shapes)
    width = torch.tensor([], dtype=dtype).element_size()
    header: Dict[str, object] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for n in names:
        nbytes = math.prod(int(x) for x in shapes[n]) * width
        header[n] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": [int(x) for x in shapes[n]],
                     "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for n in names:
            t = fetch(n).detach().to("cpu", dtype).contiguous()
            if list(t.shape) != [int(x) for x in shapes[n]]:
                raise CheckpointError(f"{n}: has shape {list(t.shape)}, expected {list(shapes[n])}")
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # no copy
            del t


def save_pretrained(params: Dict[str, torch.Tensor], model_config: dict, output_dir: str, weights: str = "safetensors",
                    dtype: str = "fp32", tokenizer: str = "byte", fingerprint: Optional[str] = None,
                    info: Optional[dict] = None) -> List[str]:
    """Write a model directory (must not exist, or be empty) atomically from full plain tensors
    (tied aliases once). Returns the files written."""
    return write_model_dir({n: list(t.shape) for n, t in params.items()}, params.__getitem__, model_config,
                           output_dir, weights, dtype, tokenizer, fingerprint, info)


def write_model_dir(shapes: Dict[str, List[int]], fetch: Callable[[str], torch.Tensor], model_config: dict,
                    output_dir: str, weights: str = "safetensors", dtype: str = "fp32", tokenizer: str = "byte",
                    fingerprint: Optional[str] = None, info: Optional[dict] = None) -> List[str]:
    """`save_pretrained` from a tensor source: `fetch(name)` is called once per tensor (streamed into
    model.safetensors; model.pt needs them all at once, as torch.save does)."""
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
        name = "model.safetensors" if weights == "safetensors" else "model.pt"
        if weights == "safetensors":
            write_safetensors(os.path.join(tmp, name), shapes, fetch, DTYPES[dtype],
                              metadata={"format": "pt", "megams": EXPORT_FORMAT})
        else:
            torch.save({n: fetch(n).detach().to("cpu", DTYPES[dtype]).contiguous() for n in shapes},
                       os.path.join(tmp, name))
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(model_config, f, indent=1)
        written = [name, CONFIG_FILE] + _tokenizer_files(tokenizer, fingerprint, tmp)
        info = {"format": EXPORT_FORMAT, "output": output_dir, "model": model_config,
                "weights": {"file": name, "dtype": dtype,
                            "parameters": sum(math.prod(int(x) for x in s) for s in shapes.values())},
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


def _export_info(path: str, meta: dict, files: List[str]) -> dict:
    cfg = meta["config"]
    return {"source": {"checkpoint": path, "step": int(meta["step"]), "layout": meta["layout"],
                       "files": [os.path.basename(p) for p in files]},
            "training": {"data": cfg["data"], "seed": cfg["training"]["seed"],
                         "precision": cfg["training"]["precision"]},
            "validation": _validation(path, int(meta["step"]))}


def export_pretrained(state: TrainingState, output_dir: str, weights: str = "safetensors", dtype: str = "fp32",
                      tokenizer: Optional[str] = None) -> List[str]:
    """A training checkpoint read by `read_checkpoint` -> a model directory (see pretrained.py)."""
    spec = tokenizer or state.meta["config"]["data"]["tokenizer"]
    return save_pretrained(state.params, state.model_config, output_dir, weights, dtype, spec,
                           None if tokenizer else state.meta.get("tokenizer"),
                           _export_info(state.path, state.meta, state.files))


def export_checkpoint(path: str, output_dir: str, weights: str = "safetensors", dtype: str = "fp32",
                      tokenizer: Optional[str] = None, checksums: bool = True) -> Tuple[List[str], List[str], int]:
    """A training checkpoint -> a model directory, streamed: each full tensor is assembled from the
    memory-mapped shards that hold it and written before the next is read (peak memory: one full
    tensor plus its shards' scratch; with weights="pt" the whole model, which torch.save needs).
    Returns (files written, report lines, parameter count)."""
    from megams.checkpoint.reader import describe
    from megams.checkpoint.sharded import open_checkpoint
    src = open_checkpoint(path, checksums=checksums)
    paths = list(dict.fromkeys(src.files.all_files()))  # every file there and readable before any is used
    for p in paths:
        src.load(p)
    meta = src.meta
    spec = tokenizer or meta["config"]["data"]["tokenizer"]
    shapes = {n: src.plain_shape(n) for n in src.names()}
    try:
        written = write_model_dir(shapes, src.read, meta["config"]["model"], output_dir, weights, dtype, spec,
                                  None if tokenizer else meta.get("tokenizer"), _export_info(src.path, meta, paths))
    except KeyError as e:
        raise CheckpointError(f"{src.path}: truncated or corrupted checkpoint shard (missing entry {e})") from None
    st = src.stats
    report = describe(src, len(paths)) + [f"streamed tensor by tensor: {st.read / 2 ** 20:.1f} MiB read, largest "
                                          f"scratch buffer {st.peak_transient / 2 ** 20:.1f} MiB"]
    return written, report, sum(math.prod(int(x) for x in s) for s in shapes.values())

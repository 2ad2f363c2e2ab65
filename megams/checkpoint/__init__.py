"""Checkpoint tools: any training layout to a plain-torch model directory and back.

    from megams.checkpoint import read_checkpoint, export_pretrained, load_pretrained
    state = read_checkpoint("runs/x")                 # any dp / tp / pp / ZeRO 0-3 / fp32 or bf16
    export_pretrained(state, "exported/")             # model.safetensors + config.json + tokenizer + README
    model = load_pretrained("exported/")              # torch only (also: from megams import load_pretrained)

- `layout.py`      what the trainer records in megams.json about how parameters are split
- `serialization.py` reading DeepSpeed files with weights_only=True (no deepspeed import)
- `zero.py`        ZeRO 1/2/3 flat partitions -> named tensors
- `reader.py`      a checkpoint directory -> full fp32 tensors (+ optimizer moments) by plain name
- `sharded.py`     the lazy reader under it: one rank's box of one parameter from memory-mapped shards
- `export.py` / `pretrained.py`  the plain-torch model directory, written and read
- `reshard.py`     start training from another layout (trainer's `checkpoint.load_from`)
No module here imports deepspeed at import time (reading checkpoints never needs it); `reshard.py`
works on the live DeepSpeed engine the trainer hands it.
"""
from megams.checkpoint.errors import CheckpointError
from megams.checkpoint.export import export_pretrained, save_model, save_pretrained
from megams.checkpoint.pretrained import is_pretrained_dir, load_pretrained, load_tokenizer, read_config
from megams.checkpoint.reader import TrainingState, read_checkpoint, resolve_checkpoint

__all__ = ["CheckpointError", "read_checkpoint", "resolve_checkpoint", "TrainingState", "export_pretrained",
           "save_pretrained", "save_model",
           "load_pretrained", "load_tokenizer", "read_config", "is_pretrained_dir"]

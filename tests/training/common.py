"""Shared helpers for training tests: tiny configs and metrics readers."""
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_args(model="vanilla", run_dir="runs/test", steps=4, extra=()):
    """argv for launch/pretrain.py: a very small, fast run of a tiny config."""
    sets = [f"training.run_dir={run_dir}", f"training.max_steps={steps}", "training.seq_len=64" if False else "data.seq_len=64",
            "training.micro_batch_size=2", "training.global_batch_size=4", "training.eval_batches=2",
            "training.eval_interval=0", "checkpoint.interval=2", "logging.progress_bar=false",
            "model.d_model=32", "model.n_heads=2", "optimizer.warmup=0"]
    argv = ["--config", os.path.join(ROOT, "configs", "tiny", f"{model}.yaml")]
    for s in sets + list(extra):
        argv += ["--set", s]
    return argv


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    steps = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "val_loss" in r]
    return steps, evals


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir)[0]]

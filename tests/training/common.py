"""Shared helpers for training tests: tiny configs and metrics readers."""
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pretrain_argv(config, overrides):
    """argv for launch/pretrain.py: `--config CONFIG` and one `--set` per override."""
    argv = ["--config", config]
    for s in overrides:
        argv += ["--set", s]
    return argv


def tiny_args(model="vanilla", run_dir="runs/test", steps=4, extra=()):
    """argv for launch/pretrain.py: a very small, fast run of a tiny config."""
    sets = [f"training.run_dir={run_dir}", f"training.max_steps={steps}", "data.seq_len=64",
            "training.micro_batch_size=2", "training.global_batch_size=4", "training.eval_batches=2",
            "training.eval_interval=0", "checkpoint.interval=2", "logging.progress_bar=false",
            "model.d_model=32", "model.n_heads=2", "optimizer.warmup=0"]
    return pretrain_argv(os.path.join(ROOT, "configs", "tiny", f"{model}.yaml"), sets + list(extra))


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    steps = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "val_loss" in r]
    return steps, evals


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir)[0]]


class _NanGrad:
    """Identity forward, NaN gradient backward."""

    @staticmethod
    def apply(x):
        import torch

        class F(torch.autograd.Function):
            @staticmethod
            def forward(ctx, t):
                return t.clone()

            @staticmethod
            def backward(ctx, g):
                return g * float("nan")
        return F.apply(x)


def inject_nonfinite(monkeypatch_or_none, steps, grad_accum, kind="loss", ranks=None):
    """Make megams.training.loss.lm_loss non-finite on training steps `steps` (1-based) of this
    process: kind="loss" returns a NaN loss, kind="grad" a finite loss whose gradient is NaN.
    `grad_accum`: loss calls per step on this rank. `ranks`: only on these ranks (RANK env).
    Without a monkeypatch fixture, returns a function that undoes the patch."""
    import os

    import megams.training.loss as loss_mod
    original = loss_mod.lm_loss
    calls = {"n": 0}

    def lm_loss(logits, targets):
        loss = original(logits, targets)
        step = calls["n"] // grad_accum + 1
        calls["n"] += 1
        rank = int(os.environ.get("RANK", "0"))
        if step in steps and (ranks is None or rank in ranks) and logits.requires_grad:
            return loss * float("nan") if kind == "loss" else _NanGrad.apply(loss)
        return loss

    if monkeypatch_or_none is not None:
        monkeypatch_or_none.setattr(loss_mod, "lm_loss", lm_loss)
        return None
    loss_mod.lm_loss = lm_loss

    def undo():
        loss_mod.lm_loss = original
    return undo

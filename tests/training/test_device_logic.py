"""Issue 12's device logic, checked on CPU: which GPU a rank takes, and evaluation that never runs more
than one micro-batch through the model at once (a paper config on one GPU would otherwise build
~17 GB of full-vocabulary logits)."""
import pytest

from megams.config import ConfigError
from megams.training.trainer import _cuda_device
from tests.helpers.multiproc import run_ranks
from tests.training.common import tiny_args


@pytest.mark.parametrize("local_rank,count,backend,want", [
    (0, 8, "nccl", "cuda:0"), (7, 8, "nccl", "cuda:7"),
    (1, 1, "gloo", "cuda:0"), (3, 2, "gloo", "cuda:1"),   # gloo: ranks may share a device
])
def test_device_of_a_rank(local_rank, count, backend, want):
    assert _cuda_device(local_rank, count, backend) == want


def test_more_ranks_than_gpus_is_refused_with_the_count(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ConfigError) as e:
        _cuda_device(2, 2, "nccl")
    msg = str(e.value)
    assert "local rank 2 has no GPU of its own: 2 CUDA device(s) visible (CUDA_VISIBLE_DEVICES=0,1)" in msg
    assert "training.dist_backend=gloo" in msg


def test_no_device_is_refused():
    with pytest.raises(ConfigError, match="CUDA reports no device"):
        _cuda_device(0, 0, "nccl")


def _batch_sizes_seen(rank, world, argv):
    """(grad enabled, rows) of every forward of the model on token ids, during a real run."""
    import torch
    from torch.nn.modules.module import register_module_forward_hook
    from megams.training.trainer import main
    seen = []

    def hook(module, args, out):
        x = args[0] if args else None
        if torch.is_tensor(x) and x.dtype == torch.long and x.ndim == 2 and type(module).__name__ not in ("Embedding", "DeepSpeedEngine"):
            seen.append((torch.is_grad_enabled(), int(x.shape[0])))
    handle = register_module_forward_hook(hook)
    try:
        rc = main(argv)
    finally:
        handle.remove()
    return rc, seen


@pytest.mark.parametrize("model", ["vanilla", "bottom_up"])
def test_evaluation_runs_in_micro_batches(tmp_path, model):
    """global batch 8 on one rank, micro-batch 2: evaluation used to run all 8 windows in one forward."""
    argv = tiny_args(model, str(tmp_path / "run"), steps=2, extra=[
        "training.global_batch_size=8", "training.micro_batch_size=2", "training.eval_batches=2",
        "training.eval_interval=1", "checkpoint.interval=0"])
    (rc, seen), = run_ranks(1, [(_batch_sizes_seen, (argv,))], timeout=240)[0]
    assert rc == 0
    evals = [n for grad, n in seen if not grad]
    train = [n for grad, n in seen if grad]
    assert train and set(train) == {2}
    assert len(evals) == 2 * 2 * 8 // 2 and set(evals) == {2}  # 2 evaluations x 2 batches x 8 windows / 2


def _loss_syncs(rank, world, argv):
    """Calls of the trainer's one host sync of the training loss (`_dp_mean`), and the steps logged."""
    import megams.training.trainer as trainer
    calls, real = [], trainer._dp_mean

    def counting(local, layout):
        calls.append(1)
        return real(local, layout)
    trainer._dp_mean = counting
    try:
        rc = trainer.main(argv)
    finally:
        trainer._dp_mean = real
    return rc, len(calls)


def test_training_loss_syncs_once_per_logged_step(tmp_path):
    """6 steps of 4 micro-batches, logged every 3 steps: 2 host syncs of the loss, not 6 or 24."""
    run = tmp_path / "run"
    argv = tiny_args("vanilla", str(run), steps=6, extra=[
        "training.global_batch_size=8", "training.micro_batch_size=2", "logging.interval=3", "checkpoint.interval=0"])
    (rc, syncs), = run_ranks(1, [(_loss_syncs, (argv,))], timeout=240)[0]
    assert rc == 0
    from tests.training.common import read_metrics
    steps, _ = read_metrics(str(run))
    assert [r["step"] for r in steps] == [3, 6] and all(r["loss"] is not None for r in steps)
    assert syncs == 2

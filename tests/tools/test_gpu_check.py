"""tools/gpu_check.sh --dry-run (CI keeps the GPU check from rotting) and its verification helpers."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import gpu_check_verify as verify  # noqa: E402


def _dry(tmp_path, *args):
    env = dict(os.environ, WORK=str(tmp_path), OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    return subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_check.sh"), "--dry-run", *args],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


def test_dry_run_lists_every_check(tmp_path):
    p = _dry(tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    out = p.stdout
    lines = [line for line in out.splitlines() if line.startswith("+ [")]
    launches = [line for line in lines if "launch/pretrain.py" in line]
    nccl = [line for line in launches if "deepspeed.launcher.runner --num_gpus 1" in line]
    for model in ("vanilla", "bottom_up", "top_down", "retina"):
        for prec in ("bf16", "fp16"):
            assert any(f"configs/tiny/{model}.yaml" in line and f"training.precision={prec}" in line
                       and "training.dist_backend=nccl" in line for line in nccl), (model, prec)
        assert any(f"[{model}_bf16_z" in line and ".resume]" in line for line in nccl), model
        assert any(f"[{model}_bf16_z" in line and "tools/convert_checkpoint.py" in line for line in lines)
        assert any(f"[{model}_bf16_z" in line and "tools/evaluate.py" in line for line in lines)
        assert any(f"[{model}_bf16_z" in line and "loss_equal" in line for line in lines)
    for zero in range(4):
        for prec in ("bf16", "fp16"):
            assert any(f"parallel.zero_stage={zero}" in line and f"training.precision={prec}" in line
                       for line in nccl), (zero, prec)
    gloo = [line for line in launches if "torch.distributed.run --nproc_per_node 2" in line]
    assert any("parallel.tensor=2" in line and "training.dist_backend=gloo" in line for line in gloo)
    assert any("parallel.pipeline=2" in line and "training.dist_backend=gloo" in line for line in gloo)
    assert any("-m pytest -m gpu" in line for line in lines)
    assert any("tools/benchmark_gpu.py --sizes d2048 --models vanilla" in line for line in lines)
    assert any("tools/benchmark.py prefetch --device cuda" in line for line in lines)
    assert f"{len(launches)} pretrain configurations load" in out  # every --set is a valid override
    assert not os.path.exists(tmp_path / "runs")  # nothing ran


def test_dry_run_full_matrix(tmp_path):
    p = _dry(tmp_path, "--full")
    assert p.returncode == 0, p.stderr[-2000:]
    nccl = [line for line in p.stdout.splitlines() if "deepspeed.launcher.runner" in line and ".resume]" not in line]
    assert len(nccl) == 4 * 2 * 4


def test_unknown_argument(tmp_path):
    p = _dry(tmp_path, "--fast")
    assert p.returncode == 2 and "unknown argument --fast" in p.stderr


def test_d2048_is_a_benchmark_size():
    import benchmark_gpu
    assert benchmark_gpu.GPU_SIZES["d2048"][0] == 2048


def _write_metrics(run_dir, recs):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")


def test_verify_metrics_and_loss_equal(tmp_path):
    run = str(tmp_path / "run")
    _write_metrics(run, [{"step": s, "loss": 5.0 - 0.1 * s} for s in range(1, 21)] + [{"step": 20, "val_loss": 3.2}])
    assert "step 20" in verify.metrics(run, "20")
    with pytest.raises(SystemExit, match="expected 30"):
        verify.metrics(run, "30")
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps({"loss": 3.21}))
    assert "3.21000 vs trainer val_loss 3.20000" in verify.loss_equal(str(ev), run, "2e-2")
    ev.write_text(json.dumps({"loss": 3.5}))
    with pytest.raises(SystemExit, match="FAILED"):
        verify.loss_equal(str(ev), run, "2e-2")
    _write_metrics(run, [{"step": 20, "loss": float("nan")}, {"step": 20, "val_loss": 3.2}])
    with pytest.raises(SystemExit, match="non-finite"):
        verify.metrics(run, "20")


def test_verify_report_table(tmp_path):
    steps = tmp_path / "steps.jsonl"
    steps.write_text(json.dumps({"step": "a", "rc": 0, "seconds": 1.5, "detail": "fine"}) + "\n"
                     + json.dumps({"step": "b", "rc": 124, "seconds": 0, "detail": "skipped"}) + "\n")
    md, js = tmp_path / "r.md", tmp_path / "r.json"
    with pytest.raises(SystemExit, match="1 step"):
        verify.report(str(steps), str(md), str(js))
    text = md.read_text()
    assert "| a | ok | 2 | fine |" in text and "| b | skipped |" in text and "1/2 passed" in text
    assert json.loads(js.read_text())["passed"] == 1

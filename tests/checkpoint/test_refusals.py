"""Refusals of the checkpoint reader and tools, with their exact messages (in-process calls), on
checkpoints of several layouts. Not a checkpoint, an output directory that is not empty and
`checkpoint.load_from` of another model are catalogue entries (docs/ERRORS.md, tests/errors/)."""
import json
import os
import shutil

import pytest
import torch

from megams.checkpoint import CheckpointError, load_pretrained, read_checkpoint
from tests.checkpoint.conftest import tool


def _pick(runs, **want):
    for run in runs.values():
        if all(run.case[k] == v for k, v in want.items()):
            return run
    pytest.skip(f"no default-run checkpoint with {want}")


def _copy_ckpt(run, tmp_path, manifest=True):
    """A copy of a checkpoint; manifest=False drops the manifest from megams.json (a checkpoint of
    megams-checkpoint/1), so the reader's own checks of which files a layout needs are what refuses."""
    dst = tmp_path / "step_00000002"
    shutil.copytree(run.ckpt, dst)
    if not manifest:
        meta = json.loads((dst / "megams.json").read_text())
        meta.pop("manifest")
        meta["format"] = "megams-checkpoint/1"
        (dst / "megams.json").write_text(json.dumps(meta))
    return str(dst)


def _convert(capsys, *argv):
    rc = tool("convert_checkpoint").main([str(a) for a in argv])
    return rc, capsys.readouterr().err.strip()


def test_megams_json_of_another_format(tmp_path):
    (tmp_path / "megams.json").write_text(json.dumps({"format": "something-else/3"}))
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(str(tmp_path))
    assert str(e.value) == (f"{tmp_path}/megams.json: not a megams checkpoint (format 'something-else/3', "
                            "expected one of megams-checkpoint/1, megams-checkpoint/2)")


def test_run_directory_without_a_checkpoint(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(str(tmp_path))
    assert str(e.value) == f"{tmp_path}: run directory without a complete checkpoint (no checkpoints/latest)"


def test_missing_source_directory(tmp_path):
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(str(tmp_path / "nope"))
    assert str(e.value) == f"{tmp_path}/nope: no such directory"


def test_truncated_shard(default_runs, tmp_path, capsys):
    run = _pick(default_runs, tp=1, pp=1, zero=2)
    ckpt = _copy_ckpt(run, tmp_path, manifest=False)
    shard = os.path.join(ckpt, "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[:len(data) // 2])
    rc, err = _convert(capsys, ckpt, tmp_path / "out")
    assert rc == 2
    assert err == f"error: {shard}: truncated or corrupted checkpoint shard (not a complete torch zip archive)"


def test_missing_data_parallel_rank(default_runs, tmp_path, capsys):
    run = _pick(default_runs, tp=1, pp=1, zero=2, precision="fp32")
    ckpt = _copy_ckpt(run, tmp_path, manifest=False)
    os.remove(os.path.join(ckpt, "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    rc, err = _convert(capsys, ckpt, tmp_path / "out")
    assert rc == 2
    assert err == (f"error: {ckpt}: missing rank: zero_pp_rank_1_mp_rank_00_optim_states.pt not found (optimizer "
                   "partition of data-parallel rank 1, model-parallel rank 0; layout dp=2 tp=1 pp=1 zero_stage=2 "
                   "precision=fp32)")


def test_missing_tensor_parallel_rank(default_runs, tmp_path):
    run = _pick(default_runs, tp=2, pp=1)
    ckpt = _copy_ckpt(run, tmp_path, manifest=False)
    z = run.case["zero"]
    name = f"zero_pp_rank_0_mp_rank_01_model_states.pt" if z == 3 else "mp_rank_01_model_states.pt"
    os.remove(os.path.join(ckpt, name))
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(ckpt)
    what = ("model states of data-parallel rank 0, model-parallel rank 1" if z == 3
            else "model states of model-parallel rank 1")
    assert str(e.value) == (f"{ckpt}: missing rank: {name} not found ({what}; layout dp=1 tp=2 pp=1 "
                            f"zero_stage={z} precision={run.case['precision']})")


def test_shard_that_pickles_foreign_objects_is_refused(default_runs, tmp_path):
    run = _pick(default_runs, tp=1, pp=1, zero=0)
    ckpt = _copy_ckpt(run, tmp_path)
    shard = os.path.join(ckpt, "mp_rank_00_model_states.pt")
    sd = torch.load(shard, weights_only=True)
    sd["hook"] = os.system  # what a malicious file would carry: never called, never even unpickled
    torch.save(sd, shard)
    with pytest.raises(CheckpointError) as e:  # the manifest no longer matches
        read_checkpoint(ckpt)
    assert str(e.value) == f"{shard}: corrupted checkpoint shard (sha256 differs from the manifest)"
    from megams.checkpoint import manifest as mf
    meta = json.load(open(os.path.join(ckpt, "megams.json")))
    meta["manifest"]["files"]["mp_rank_00_model_states.pt"] = mf.sha256_file(shard)
    with open(os.path.join(ckpt, "megams.json"), "w") as f:  # an attacker who rewrites the manifest too
        json.dump(meta, f)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(ckpt)
    assert str(e.value) == (f"{shard}: refusing to load: the file pickles objects other than tensors and "
                            "the DeepSpeed records megams allows (posix.system)")


def test_load_pretrained_refusals(default_runs, tmp_path):
    run = _pick(default_runs, tp=1, pp=1, zero=0)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(str(tmp_path))
    assert str(e.value) == (f"{tmp_path}: not a megams model directory (no config.json; convert a training "
                            "checkpoint with tools/convert_checkpoint.py)")
    bad = tmp_path / "bad"
    shutil.copytree(run.converted, bad)
    cfg = json.load(open(bad / "config.json"))
    cfg["n_layers"] += 1
    json.dump(cfg, open(bad / "config.json", "w"))
    with pytest.raises(CheckpointError) as e:
        load_pretrained(str(bad))
    assert str(e.value).startswith(f"{bad}/model.safetensors: weights do not match the model of config.json (missing "
                                   f"blocks.{cfg['n_layers'] - 1}.")
    cut = tmp_path / "cut"
    shutil.copytree(run.converted, cut)
    data = open(cut / "model.safetensors", "rb").read()
    open(cut / "model.safetensors", "wb").write(data[:len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_pretrained(str(cut))
    assert str(e.value).startswith(f"{cut}/model.safetensors: truncated or corrupted weights file (")

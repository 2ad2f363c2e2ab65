"""Atomic checkpoints: the manifest, verification before anything is unpickled, rotation, a crash at
every point of a save, and a full disk. The trainer runs in-process (`main(argv)`); the crashes are
real SIGKILLs of a trainer subprocess (tests/helpers/die_at.py)."""
import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest
import torch

from megams.checkpoint import manifest as mf
from megams.training import checkpoint as ckpt
from megams.training.trainer import main
from tests.errors.catalogue import entry, outcome
from tests.helpers.multiproc import run_ranks
from tests.training.common import ROOT, losses, tiny_args

STEPS = 6
EXTRA = ["logging.interval=1", "checkpoint.keep_last=2"]


def _args(run_dir, steps=STEPS, extra=()):
    return tiny_args("vanilla", run_dir, steps=steps, extra=EXTRA + list(extra))


def _main(argv):
    """In-process run; the environment it exports (RANK, MASTER_PORT, ...) is restored afterwards."""
    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return rc, out.getvalue(), [line for line in err.getvalue().splitlines() if line.startswith("error:")]


def _tree_digest(path):
    h = hashlib.sha256()
    if os.path.isfile(path):
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    for d, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(d, f)
            h.update(p.encode())
            with open(p, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def _latest_tag(run_dir):
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        return f.read()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run: 6 steps, checkpoints at 2, 4, 6 (keep_last=2)."""
    run_dir = str(tmp_path_factory.mktemp("integrity") / "ref")
    rc, out, errors = _main(_args(run_dir))
    assert rc == 0, errors
    return run_dir, losses(run_dir)


def _copy(reference, tmp_path):
    dst = str(tmp_path / "run")
    shutil.copytree(reference[0], dst)
    return dst


def test_manifest_records_every_file_and_the_run(reference):
    run_dir, _ = reference
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["latest", "step_00000004", "step_00000006"]
    path = ckpt.latest_checkpoint(run_dir)
    meta = ckpt.read_meta(path)
    assert meta["format"] == "megams-checkpoint/2" and meta["step"] == STEPS
    assert meta["consumed_tokens"] == STEPS * 4 * 64
    assert meta["data"]["consumed_samples"] == STEPS * 4
    assert meta["config"]["training"]["max_steps"] == STEPS
    assert meta["code_version"]["megams"] and meta["code_version"]["torch"]
    files = meta["manifest"]["files"]
    assert sorted(files) == mf.list_files(path) == ["mp_rank_00_model_states.pt", "rng/rank_00000.pt"]
    for name, rec in files.items():
        assert mf.sha256_file(os.path.join(path, name)) == rec
    # the RNG file is plain tensors and ints: it loads with weights_only=True
    assert set(torch.load(os.path.join(path, "rng", "rank_00000.pt"), weights_only=True)) >= {"torch", "numpy"}


def _flip_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _drop_pickle(path):
    torch.save({"payload": os.system}, os.path.join(os.path.dirname(path), "extra.pt"))


def _replace_and_relist(path):
    """An attacker who also rewrites the manifest: the pickle scan still refuses the file."""
    torch.save({"torch": torch.get_rng_state(), "hook": os.system}, path)
    ck = os.path.dirname(os.path.dirname(path))
    meta = ckpt.read_meta(ck)
    meta["manifest"]["files"]["rng/rank_00000.pt"] = mf.sha256_file(path)
    with open(os.path.join(ck, "megams.json"), "w") as f:
        json.dump(meta, f)


TAMPER = {
    "same_size_corruption": ("mp_rank_00_model_states.pt", _flip_byte,
                             "{path}: corrupted checkpoint shard (sha256 differs from the manifest)"),
    "truncated_shard": ("mp_rank_00_model_states.pt", _truncate,
                        "{path}: truncated or corrupted checkpoint shard ({half} bytes, the manifest says {size})"),
    "missing_file": ("mp_rank_00_model_states.pt", os.unlink, "{path}: missing (the manifest lists it, {size} bytes)"),
    "file_added_later": ("mp_rank_00_model_states.pt", _drop_pickle,
                         "{dir}/extra.pt: not in the checkpoint's manifest (added after the checkpoint was written?): "
                         "refusing to load the checkpoint"),
    "crafted_pickle": ("rng/rank_00000.pt", _replace_and_relist,
                       "{path}: refusing to load: the file pickles objects other than tensors and the DeepSpeed "
                       "records megams allows (posix.system)"),
}


def _refused(reference, tmp_path, monkeypatch, case):
    """Damage a copy of the reference run's latest checkpoint, resume: refused before DeepSpeed opens
    any file, with the expected message, and nothing in the run directory touched."""
    run_dir = _copy(reference, tmp_path)
    name, tamper, message = TAMPER[case]
    ck = os.path.join(run_dir, "checkpoints", "step_00000006")
    path = os.path.join(ck, name)
    size = os.path.getsize(path)
    tamper(path)
    before = _tree_digest(os.path.join(run_dir, "checkpoints")), _tree_digest(os.path.join(run_dir, "metrics.jsonl"))
    opened = []
    import deepspeed.runtime.engine as ds_engine
    monkeypatch.setattr(ds_engine.DeepSpeedEngine, "load_checkpoint", lambda *a, **k: opened.append(a))
    rc, out, errors = _main(_args(run_dir, steps=8))
    assert rc == 2 and errors == ["error: " + message.format(path=path, dir=ck, size=size, half=size // 2)]
    assert not opened  # refused before DeepSpeed (which unpickles with weights_only=False) saw any file
    after = _tree_digest(os.path.join(run_dir, "checkpoints")), _tree_digest(os.path.join(run_dir, "metrics.jsonl"))
    assert after == before  # nothing touched
    return outcome(rc, errors, out), path


def test_integrity__checksum_mismatch(reference, tmp_path, monkeypatch):
    result, path = _refused(reference, tmp_path, monkeypatch, "same_size_corruption")
    entry("integrity.checksum_mismatch").check(result, path)


def test_integrity__size_mismatch(reference, tmp_path, monkeypatch):
    result, path = _refused(reference, tmp_path, monkeypatch, "truncated_shard")
    entry("integrity.size_mismatch").check(result, path)


def test_integrity__file_added(reference, tmp_path, monkeypatch):
    result, path = _refused(reference, tmp_path, monkeypatch, "file_added_later")
    entry("integrity.file_added").check(result, os.path.join(os.path.dirname(path), "extra.pt"))


def test_integrity__crafted_pickle(reference, tmp_path, monkeypatch):
    result, path = _refused(reference, tmp_path, monkeypatch, "crafted_pickle")
    entry("integrity.crafted_pickle").check(result, path, "posix.system")


def test_a_missing_file_is_named(reference, tmp_path, monkeypatch):
    _refused(reference, tmp_path, monkeypatch, "missing_file")


def test_integrity__latest_incomplete(reference, tmp_path):
    run_dir = _copy(reference, tmp_path)
    pointer = os.path.join(run_dir, "checkpoints", "latest")
    with open(pointer, "w") as f:
        f.write("step_00000099")
    rc, out, errors = _main(_args(run_dir, steps=8))
    assert rc == 2 and errors == [
        f"error: {pointer}: names 'step_00000099', which is not a complete checkpoint (no megams.json); point it at "
        f"a complete step_* directory or remove it to start afresh"]
    entry("integrity.latest_incomplete").check(outcome(rc, errors, out), pointer)


def test_rotation_keeps_the_newest_and_never_the_one_latest_names(tmp_path):
    root = str(tmp_path)
    for s in (1, 2, 3, 4):
        os.makedirs(os.path.join(root, ckpt.tag_for(s)))
        with open(os.path.join(root, ckpt.tag_for(s), "megams.json"), "w") as f:
            f.write("{}")
    os.makedirs(os.path.join(root, "nonfinite_step_00000002"))
    with open(os.path.join(root, "latest"), "w") as f:
        f.write(ckpt.tag_for(1))  # an operator pointed latest back at an old checkpoint
    removed = ckpt.rotate(root, keep_last=2)
    assert [os.path.basename(p) for p in removed] == ["step_00000002"]
    assert sorted(os.listdir(root)) == ["latest", "nonfinite_step_00000002", "step_00000001", "step_00000003",
                                        "step_00000004"]


# --- a crash at every point of a save -------------------------------------------------------------------
PHASES = {  # phase -> the checkpoint `latest` must name after the kill at the step-4 (rotate: step-6) save
    "shards": (4, "step_00000002"), "manifest": (4, "step_00000002"), "meta": (4, "step_00000002"),
    "rename": (4, "step_00000002"), "rotate": (6, "step_00000006"),
}


@pytest.mark.parametrize("phase", list(PHASES))
def test_killed_while_saving_the_previous_checkpoint_still_loads(reference, tmp_path, phase):
    run_dir = str(tmp_path / "run")
    step, expect_latest = PHASES[phase]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    p = subprocess.run([sys.executable, "-m", "tests.helpers.die_at", phase, str(step), "--", *_args(run_dir)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-3000:]
    assert _latest_tag(run_dir) == expect_latest
    good = ckpt.latest_checkpoint(run_dir)
    mf.verify(good, ckpt.read_meta(good))  # complete and intact
    rc, out, errors = _main(_args(run_dir))
    assert rc == 0 and not errors, errors
    if step == STEPS:
        assert "run already at training.max_steps=6" in out
    else:
        assert f"resumed from {good} at step 2" in out
    assert losses(run_dir) == reference[1]  # every step once, bit for bit
    assert not [n for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.endswith(".tmp")]


# --- disk full -----------------------------------------------------------------------------------------------
def case_disk_full_on_rank1(rank, world, run_dir):
    """Rank 1's optimizer partition hits ENOSPC at the step-4 save; then the same run again, healthy."""
    real_save = torch.save

    def save(obj, f, *a, **k):
        if rank == 1 and isinstance(f, str) and "step_00000004.tmp" in f and "optim_states" in f:
            raise OSError(errno.ENOSPC, "No space left on device", f)
        return real_save(obj, f, *a, **k)
    torch.save = save
    try:
        first = _main(_args(run_dir, extra=["parallel.zero_stage=1"]))
    finally:
        torch.save = real_save
    tmp_left = [n for n in os.listdir(os.path.join(run_dir, "checkpoints")) if ".tmp" in n]
    latest = _latest_tag(run_dir)
    second = _main(_args(run_dir, extra=["parallel.zero_stage=1"]))
    return first, tmp_left, latest, second


def test_integrity__disk_full(tmp_path):
    """Two ranks, ZeRO-1; rank 1 alone hits ENOSPC: both report it, exit 3, the partial checkpoint is
    gone, `latest` still names step 2, and the same command then resumes from it."""
    run_dir = str(tmp_path / "run")
    (r0, r1) = run_ranks(2, [(case_disk_full_on_rank1, (run_dir,))], timeout=300)[0]
    root = os.path.join(run_dir, "checkpoints")
    for first, tmp_left, latest, second in (r0, r1):
        rc, _, errors = first
        assert rc == 3 and len(errors) == 1, errors
        assert errors[0].startswith(f"error: checkpoint not saved at step 4: {root}: no space left on device while "
                                    f"writing a checkpoint ([Errno 28] No space left on device")
        assert tmp_left == [] and latest == "step_00000002"
        entry("integrity.disk_full").check(outcome(rc, errors), root, "No space left on device")
    rc, out, errors = r0[3]
    assert rc == 0 and f"resumed from {root}/step_00000002 at step 2" in out
    from tests.training.common import read_metrics
    assert [r["step"] for r in read_metrics(run_dir)[0]] == list(range(1, STEPS + 1))


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2200k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield str(mnt)
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_integrity__not_enough_space(small_tmpfs):
    """A 2.2 MB tmpfs holds the step-2 checkpoint (0.8 MB) but not a second one next to it."""
    run_dir = os.path.join(small_tmpfs, "run")
    rc, _, errors = _main(_args(run_dir))
    root = os.path.join(run_dir, "checkpoints")
    assert rc == 3 and len(errors) == 1, errors
    assert errors[0].startswith(f"error: checkpoint not saved at step 4: {root}: not enough free space for a "
                                f"checkpoint: about ")
    assert errors[0].endswith("MiB free (nothing was written; the previous checkpoint is intact)")
    entry("integrity.not_enough_space").check(outcome(rc, errors), root)
    assert sorted(os.listdir(root)) == ["latest", "step_00000002"]
    good = ckpt.latest_checkpoint(run_dir)
    mf.verify(good, ckpt.read_meta(good))


def test_megams_never_unpickles_or_yaml_loads_unsafely():
    """Every torch.load call in megams/, tools/ and launch/ passes weights_only=True; YAML is read with
    safe_load only (the calls themselves, found with ast: comments and docstrings do not count)."""
    import ast
    bad, calls = [], 0
    for top in ("megams", "tools", "launch"):
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            for name in (f for f in files if f.endswith(".py")):
                path = os.path.join(d, name)
                with open(path) as f:
                    tree = ast.parse(f.read(), path)
                for node in ast.walk(tree):
                    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                        continue
                    owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
                    if owner == "torch" and node.func.attr == "load":
                        calls += 1
                        safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value
                                   is True for k in node.keywords)
                        if not safe:
                            bad.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
                    if owner == "yaml" and node.func.attr in ("load", "unsafe_load", "full_load", "load_all"):
                        bad.append(f"{path}:{node.lineno}: yaml.{node.func.attr}")
    assert calls >= 3 and bad == []


def test_a_checkpoint_of_the_previous_format_still_resumes(reference, tmp_path):
    """megams-checkpoint/1: no manifest, numpy's RNG tuple pickled as an ndarray. Its files pass the
    pickle scan (numpy arrays allowed in rng/ only, which megams loads itself) and the run resumes."""
    import numpy as np
    run_dir = _copy(reference, tmp_path)
    ck = os.path.join(run_dir, "checkpoints", "step_00000006")
    meta = ckpt.read_meta(ck)
    meta.pop("manifest")
    meta["format"] = "megams-checkpoint/1"
    with open(os.path.join(ck, "megams.json"), "w") as f:
        json.dump(meta, f)
    rng_file = os.path.join(ck, "rng", "rank_00000.pt")
    state = torch.load(rng_file, weights_only=True)
    n = state["numpy"]
    state["numpy"] = (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    torch.save(state, rng_file)  # what megams-checkpoint/1 wrote
    rc, out, errors = _main(_args(run_dir, steps=8))
    assert rc == 0 and not errors, errors
    assert f"resumed from {ck} at step 6" in out
    assert losses(run_dir)[:STEPS] == reference[1] and len(losses(run_dir)) == 8

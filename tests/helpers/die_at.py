"""Run the trainer and SIGKILL it at one point of the checkpoint protocol (a real kill, from inside).

    python -m tests.helpers.die_at PHASE STEP -- <launch/pretrain.py arguments>

PHASE (at the save of step STEP):
  shards    while DeepSpeed writes its files: the first file is left half-written
  manifest  every rank's files written, nothing hashed, no megams.json
  meta      megams.json written into step_N.tmp, not yet renamed
  rename    step_N.tmp renamed to step_N, `latest` not yet replaced
  rotate    `latest` replaced, rotation has deleted one file of the oldest checkpoint
"""
import os
import signal
import sys


def die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(phase: str, step: int) -> None:
    import shutil

    import torch

    from megams.checkpoint import manifest as mf
    from megams.training import checkpoint as ckpt
    tmp_tag = ckpt.tag_for(step) + ckpt.TMP_SUFFIX

    if phase == "shards":
        real_save = torch.save

        def save(obj, f, *a, **k):
            if isinstance(f, str) and tmp_tag in f and "model_states" in f:
                with open(f, "wb") as fh:
                    fh.write(b"PK\x03\x04 half a file")
                die()
            return real_save(obj, f, *a, **k)
        torch.save = save
    elif phase == "manifest":
        real_hash = mf.hash_files

        def hash_files(path, names, fsync=True):
            if path.endswith(tmp_tag):
                die()
            return real_hash(path, names, fsync)
        mf.hash_files = hash_files
    elif phase in ("meta", "rename"):
        real_write = ckpt.atomic_write

        def atomic_write(path, text):
            if phase == "rename" and path.endswith("latest") and text == ckpt.tag_for(step):
                die()
            real_write(path, text)
            if phase == "meta" and tmp_tag in path and path.endswith(ckpt.META_FILE):
                die()
        ckpt.atomic_write = atomic_write
    elif phase == "rotate":
        real_rmtree = shutil.rmtree

        def rmtree(path, *a, **k):
            if os.path.basename(str(path)).startswith("step_") and not str(path).endswith(ckpt.TMP_SUFFIX):
                victim = os.path.join(path, sorted(os.listdir(path))[0])
                os.unlink(victim) if os.path.isfile(victim) else real_rmtree(victim)
                die()
            return real_rmtree(path, *a, **k)
        ckpt.shutil.rmtree = rmtree
    else:
        raise SystemExit(f"unknown phase {phase!r}")


if __name__ == "__main__":
    phase, step, sep, *argv = sys.argv[1:]
    assert sep == "--"
    install(phase, int(step))
    from megams.training.trainer import main
    sys.exit(main(argv))

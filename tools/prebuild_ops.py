"""Build DeepSpeed's CPU communication op once, at install time, into TORCH_EXTENSIONS_DIR.

`deepspeed.init_distributed()` on CPU compiles `deepspeed_shm_comm` on first use (20-30 s);
doing it here keeps that cost out of the first training run and out of test timeouts.
"""
import os
import sys
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def _clear_stale_locks(max_age_s: float = 600) -> None:
    """A build killed mid-way leaves `<ext>/lock` behind and every later load waits on it forever."""
    import glob
    import time
    root = os.environ["TORCH_EXTENSIONS_DIR"]
    for lock in glob.glob(os.path.join(root, "*", "lock")):
        if time.time() - os.path.getmtime(lock) > max_age_s:
            print(f"[prebuild_ops] removing stale build lock {lock}", file=sys.stderr)
            os.remove(lock)


def main() -> int:
    _clear_stale_locks()
    try:
        from deepspeed.accelerator import get_accelerator
        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None and builder.is_compatible():
            builder.load(verbose=False)
    except Exception as e:  # the op is an optimisation; DeepSpeed falls back to plain gloo without it
        print(f"[prebuild_ops] shm_comm op not built ({type(e).__name__}: {e}); continuing", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

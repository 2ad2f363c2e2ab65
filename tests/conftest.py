import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".venv", "torch_extensions"))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    markexpr = config.getoption("-m") or ""
    skip_full = pytest.mark.skip(reason="full matrix: run with -m full")
    for item in items:
        if "full" in item.keywords and "full" not in markexpr:
            item.add_marker(skip_full)


@pytest.fixture(scope="session")
def shared_data():
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _restore_environment():
    """In-process `main(argv)` runs export RANK/WORLD_SIZE/LOCAL_WORLD_SIZE/... (as a launcher
    would); restore the environment so later tests (and the launchers they start) never inherit them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)

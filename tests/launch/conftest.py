"""Fixtures for the launch tests: a real SLURM cluster and the software they launch.

Missing SLURM/munge/OpenMPI binaries skip the tests that need them, with the reason; in CI
(CI=true) they are a failure instead — .ci/run installs them (.ci/install_cluster_deps.sh).
"""
import os
import shutil

import pytest

from tests.launch import slurm_cluster

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
INSTALL_HINT = "run .ci/install_cluster_deps.sh (apt: slurm-wlm munge openmpi-bin libopenmpi-dev)"


def unavailable(reason: str):
    """Skip outside CI, fail in CI: CI must exercise the real launchers."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the launch tests must run; {INSTALL_HINT})", pytrace=False)
    pytest.skip(f"{reason}; {INSTALL_HINT}")


@pytest.fixture(scope="session")
def slurm():
    """A private single-node SLURM cluster (munged + slurmctld + slurmd on loopback) for the session."""
    missing = slurm_cluster.missing_binaries()
    if missing:
        unavailable(f"SLURM binaries not installed: {', '.join(missing)}")
    if os.geteuid() != 0:
        unavailable("the test SLURM cluster runs slurmd as root; these tests need root")
    cluster = slurm_cluster.start()
    try:
        yield cluster
    finally:
        slurm_cluster.stop(cluster)


@pytest.fixture(scope="session")
def mpirun():
    exe = shutil.which("mpirun")
    if exe is None:
        unavailable("mpirun (OpenMPI) not installed")
    return exe

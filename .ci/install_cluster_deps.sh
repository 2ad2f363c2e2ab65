#!/usr/bin/env bash
# Install what the launch tests run on: a real SLURM (slurmctld + slurmd + munge) and OpenMPI.
# Idempotent and quiet: does nothing when every binary is already there.
# apt does not start the services here (policy-rc.d); tests/launch/slurm_cluster.py starts
# private instances on loopback and stops them after the tests.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"   # slurmctld, slurmd and munged live in sbin
need=()
for bin in slurmctld slurmd sbatch munged mpirun; do
  command -v "$bin" >/dev/null 2>&1 || need+=("$bin")
done
[ -f /usr/include/x86_64-linux-gnu/openmpi/mpi.h ] || [ -n "$(ls /usr/lib/*/openmpi/include/mpi.h 2>/dev/null)" ] || need+=(libopenmpi-dev)
if [ ${#need[@]} -eq 0 ]; then
  echo "[cluster-deps] slurm-wlm, munge and openmpi already installed"
  exit 0
fi
echo "[cluster-deps] installing slurm-wlm munge openmpi-bin libopenmpi-dev (missing: ${need[*]})"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
LOG="$(mktemp /tmp/megams-apt.XXXXXX.log)"
if ! { $SUDO apt-get update -qq && \
       $SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge openmpi-bin libopenmpi-dev; } >"$LOG" 2>&1; then
  echo "[cluster-deps] apt-get failed; its output:" >&2
  cat "$LOG" >&2
  exit 1
fi
rm -f "$LOG"
for bin in slurmctld slurmd sbatch munged mpirun; do
  command -v "$bin" >/dev/null 2>&1 || { echo "[cluster-deps] $bin still missing after install" >&2; exit 1; }
done
echo "[cluster-deps] done"

"""Find rank / world size / local rank / master address from whichever launcher started us.

Supported: torchrun and the `deepspeed` launcher (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*),
SLURM's srun (SLURM_PROCID, ...), OpenMPI's mpirun (OMPI_COMM_WORLD_*), or nothing (one process).
`discover_and_export()` writes the standard variables so torch.distributed / DeepSpeed never fall
back to their own MPI discovery (which would take a non-loopback MASTER_ADDR).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass
class LaunchEnv:
    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int

    def describe(self) -> str:
        return (f"[megams] launcher={self.launcher} rank={self.rank}/{self.world_size} "
                f"local_rank={self.local_rank} master={self.master_addr}:{self.master_port}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def discover(env=None) -> LaunchEnv:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "deepspeed" if "CROSS_RANK" in env or env.get("DS_LAUNCHER") else (
            "torchrun" if "TORCHELASTIC_RUN_ID" in env else "env")
        return LaunchEnv(launcher, int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
                         env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))
    if "OMPI_COMM_WORLD_RANK" in env:
        return LaunchEnv("mpirun", int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                         int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
                         int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", env["OMPI_COMM_WORLD_SIZE"])),
                         env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return LaunchEnv("srun", int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                         int(env.get("SLURM_NTASKS_PER_NODE", env["SLURM_NTASKS"]).split("(")[0]),
                         env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))
    return LaunchEnv("single", 0, 1, 0, 1, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or _free_port())


def apply_thread_hygiene(le: LaunchEnv) -> int:
    """OMP_NUM_THREADS = cores / ranks on this node, only when the user has not set it."""
    if "OMP_NUM_THREADS" not in os.environ:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // max(1, le.local_world_size)))
    return int(os.environ["OMP_NUM_THREADS"])


def discover_and_export() -> LaunchEnv:
    le = discover()
    os.environ.update(RANK=str(le.rank), WORLD_SIZE=str(le.world_size), LOCAL_RANK=str(le.local_rank),
                      LOCAL_WORLD_SIZE=str(le.local_world_size), MASTER_ADDR=le.master_addr,
                      MASTER_PORT=str(le.master_port))
    return le

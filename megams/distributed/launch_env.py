"""Find rank / world size / local rank / master address from whichever launcher started us.

Checked in this order (the first that matches wins, so a launcher started inside another —
`mpirun` or `deepspeed` inside an sbatch allocation — is recognised by what it set):

  deepspeed / torchrun / env   RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
                               (deepspeed adds CROSS_RANK/CROSS_SIZE, torchrun TORCHELASTIC_RUN_ID)
  mpirun (OpenMPI)             OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}
  mpirun (MPICH / Intel MPI)   PMI_RANK, PMI_SIZE (+ MPI_LOCALRANKID / MPI_LOCALNRANKS)
  srun                         SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, SLURM_NODEID,
                               SLURM_STEP_NODELIST; master = first host of the node list
  MPI without those variables  mpi4py (COMM_WORLD rank/size, a shared-memory split for the
                               local rank, rank 0's host and a free port broadcast)
  nothing                      one process, a free loopback port

The master address never leaves the host unless the launcher says the job spans several
hosts: a single-node job (one host in the node list, local size == world size) always uses
127.0.0.1. `discover_and_export()` writes RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/
MASTER_ADDR/MASTER_PORT so torch.distributed and DeepSpeed never run their own MPI discovery
(which takes a non-loopback MASTER_ADDR from `hostname -I`).
"""
from __future__ import annotations

import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import Mapping

LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 29500


class LaunchError(RuntimeError):
    """The launcher's variables are inconsistent or not enough to find the master."""


@dataclass
class LaunchEnv:
    launcher: str            # deepspeed | torchrun | env | mpirun | srun | mpi4py | single
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    num_nodes: int = 1
    node_rank: int = 0
    detail: str = ""         # e.g. "SLURM job 42 step 0 restart 1", "OpenMPI, SLURM job 7"

    def describe(self) -> str:
        """One line for rank 0 to print: which launcher, the layout, the rendezvous, threads."""
        threads = os.environ.get("OMP_NUM_THREADS", "unset")
        detail = f" ({self.detail})" if self.detail else ""
        return (f"[megams] launcher={self.launcher}{detail} world={self.world_size} "
                f"nodes={self.num_nodes} ranks/node={self.local_world_size} rank={self.rank} "
                f"local_rank={self.local_rank} master={self.master_addr}:{self.master_port} "
                f"OMP_NUM_THREADS={threads}")


# ---------------------------------------------------------------------------------------------
# SLURM host lists

def _split_top(s: str) -> list[str]:
    """Split on commas that are not inside [...]."""
    out, depth, cur = [], 0, []
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise LaunchError(f"unbalanced brackets in SLURM node list {s!r}")
    out.append("".join(cur))
    return [x for x in (p.strip() for p in out) if x]


def _expand_range(spec: str, nodelist: str) -> list[str]:
    values = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not m:
            raise LaunchError(f"bad range {part!r} in SLURM node list {nodelist!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise LaunchError(f"descending range {part!r} in SLURM node list {nodelist!r}")
        width = len(lo)  # SLURM pads to the width of the lower bound: node[08-10]
        values += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    return values


def expand_nodelist(nodelist: str) -> list[str]:
    """`node[01-03,7],gpu[1-2]-ib,other` -> [node01, node02, node03, node7, gpu1-ib, gpu2-ib, other].

    Handles several bracket groups in one name (`rack[1-2]-n[1-2]`, expanded in order).
    """
    hosts: list[str] = []
    for item in _split_top(nodelist):
        m = re.search(r"\[([^\]]*)\]", item)
        if not m:
            hosts.append(item)
            continue
        head, tail = item[:m.start()], item[m.end():]
        for v in _expand_range(m.group(1), nodelist):
            hosts += expand_nodelist(head + v + tail)
    return hosts


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE `2(x3),1` -> [2, 2, 2, 1]."""
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise LaunchError(f"bad SLURM tasks-per-node value {spec!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def is_this_host(name: str) -> bool:
    if name in ("localhost", LOOPBACK, "::1"):
        return True
    here = {socket.gethostname(), socket.gethostname().split(".")[0]}
    if os.environ.get("SLURMD_NODENAME"):
        here.add(os.environ["SLURMD_NODENAME"])
    return name in here or name.split(".")[0] in here


def master_for_hosts(hosts: list[str]) -> str:
    """Loopback when every listed host is this one; otherwise the first host of the list."""
    if not hosts:
        return LOOPBACK
    if all(is_this_host(h) for h in hosts):
        return LOOPBACK
    return hosts[0]


# ---------------------------------------------------------------------------------------------
# per-launcher discovery

def _int(env: Mapping[str, str], *names: str, default: int | None = None) -> int:
    for n in names:
        if env.get(n, "") != "":
            try:
                return int(env[n])
            except ValueError:
                raise LaunchError(f"{n}={env[n]!r} is not an integer") from None
    if default is None:
        raise LaunchError(f"none of {', '.join(names)} is set")
    return default


def _port_from_id(job_id: str, offset: int = 0) -> int:
    """A port every rank of one job computes alike, spread over 20000-59999 by job id."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return 20000 + (int(digits) * 16 + offset) % 40000


def _from_torch_env(env: Mapping[str, str]) -> LaunchEnv:
    if "CROSS_RANK" in env:
        launcher = "deepspeed"
    elif "TORCHELASTIC_RUN_ID" in env:
        launcher = "torchrun"
    else:
        launcher = "env"
    world = _int(env, "WORLD_SIZE")
    local_world = _int(env, "LOCAL_WORLD_SIZE", "LOCAL_SIZE", default=world)
    nodes = _int(env, "CROSS_SIZE", "GROUP_WORLD_SIZE", default=max(1, world // max(1, local_world)))
    node_rank = _int(env, "CROSS_RANK", "GROUP_RANK", default=0)
    addr = env.get("MASTER_ADDR") or LOOPBACK
    if addr == "localhost":
        addr = LOOPBACK
    return LaunchEnv(launcher, _int(env, "RANK"), world, _int(env, "LOCAL_RANK", default=0), local_world,
                     addr, _int(env, "MASTER_PORT", default=DEFAULT_PORT), nodes, node_rank)


def _from_openmpi(env: Mapping[str, str]) -> LaunchEnv:
    rank, world = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
    local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", default=world)
    nodes = _int(env, "OMPI_MCA_orte_num_nodes", default=1 if local_world == world else 2)
    le = LaunchEnv("mpirun", rank, world, _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", default=0), local_world,
                   "", 0, nodes, rank // max(1, local_world), detail="OpenMPI")
    return _mpi_rendezvous(le, env, env.get("OMPI_MCA_ess_base_jobid", ""))


def _from_pmi(env: Mapping[str, str]) -> LaunchEnv:
    rank, world = _int(env, "PMI_RANK"), _int(env, "PMI_SIZE")
    if "MPI_LOCALRANKID" in env:
        local_rank, local_world = _int(env, "MPI_LOCALRANKID"), _int(env, "MPI_LOCALNRANKS", default=world)
    else:
        local_rank, local_world = _mpi4py_local(world)
    le = LaunchEnv("mpirun", rank, world, local_rank, local_world, "", 0,
                   1 if local_world == world else -(-world // local_world), rank // max(1, local_world),
                   detail="PMI")
    return _mpi_rendezvous(le, env, env.get("PMI_JOBID", "") or env.get("PMIX_NAMESPACE", ""))


def _mpi_rendezvous(le: LaunchEnv, env: Mapping[str, str], job_id: str) -> LaunchEnv:
    """MASTER_ADDR/PORT for an MPI job: the user's, else loopback (one node) or mpi4py's broadcast."""
    single = le.local_world_size == le.world_size
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if not addr and not single:
        addr, bport = _mpi4py_master(need_port=not port)
        port = port or str(bport)
    le.master_addr = addr or LOOPBACK
    le.master_port = int(port) if port else (_port_from_id(job_id) if job_id else DEFAULT_PORT)
    return le


def _mpi4py():
    try:
        from mpi4py import MPI  # noqa: F401  (initialises MPI; only reached under an MPI launcher)
    except ImportError:
        return None
    return MPI


def _mpi4py_local(world: int) -> tuple[int, int]:
    MPI = _mpi4py()
    if MPI is None:
        return 0, world
    local = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
    out = local.Get_rank(), local.Get_size()
    local.Free()
    return out


def _mpi4py_master(need_port: bool) -> tuple[str, int]:
    MPI = _mpi4py()
    if MPI is None:
        raise LaunchError("a multi-node MPI job needs MASTER_ADDR (mpirun -x MASTER_ADDR=<first host>) "
                          "or mpi4py installed to find rank 0's host")
    comm = MPI.COMM_WORLD
    payload = None
    if comm.Get_rank() == 0:
        payload = (socket.getfqdn(), _free_port("0.0.0.0") if need_port else 0)
    return comm.bcast(payload, root=0)


def _from_mpi4py(env: Mapping[str, str]) -> LaunchEnv | None:
    MPI = _mpi4py()
    if MPI is None:
        return None
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    local_rank, local_world = _mpi4py_local(world)
    hosts = comm.allgather(socket.gethostname())
    distinct = list(dict.fromkeys(hosts))
    addr = env.get("MASTER_ADDR") or master_for_hosts(distinct)
    port = env.get("MASTER_PORT") or comm.bcast(_free_port("0.0.0.0" if addr != LOOPBACK else LOOPBACK)
                                                 if rank == 0 else None, root=0)
    return LaunchEnv("mpi4py", rank, world, local_rank, local_world, addr, int(port), len(distinct),
                     distinct.index(hosts[rank]), detail=MPI.Get_library_version().splitlines()[0].strip())


def _restart(env: Mapping[str, str]) -> str:
    n = env.get("SLURM_RESTART_COUNT", "")
    return f" restart {n}" if n not in ("", "0") else ""


def _from_slurm(env: Mapping[str, str]) -> LaunchEnv:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
    hosts = expand_nodelist(nodelist) if nodelist else []
    world = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    node_rank = _int(env, "SLURM_NODEID", default=0)
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if per_node:
        counts = expand_tasks_per_node(per_node)
        local_world = counts[node_rank] if node_rank < len(counts) else counts[-1]
    else:
        local_world = world
    job, step = env.get("SLURM_JOB_ID", ""), _int(env, "SLURM_STEP_ID", "SLURM_STEPID", default=0)
    addr = env.get("MASTER_ADDR") or master_for_hosts(hosts)
    port = _int(env, "MASTER_PORT", default=_port_from_id(job, step) if job else DEFAULT_PORT)
    detail = f"SLURM job {job} step {step}" + _restart(env)
    return LaunchEnv("srun", _int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID", default=0), local_world,
                     addr, port, max(1, len(hosts)), node_rank, detail)


_MPI_MARKERS = ("PMIX_RANK", "PMI_FD", "PMI_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_RANK", "HYDRA_CONTROL_FD")


def discover(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Work out this process's place in the job from the launcher's variables (see module doc)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        le = _from_torch_env(env)
    elif "OMPI_COMM_WORLD_RANK" in env:
        le = _from_openmpi(env)
    elif "PMI_RANK" in env and "PMI_SIZE" in env:
        le = _from_pmi(env)
    elif "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and (
            "SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        # srun task. The batch script itself also has SLURM_PROCID=0 and SLURM_NTASKS, but no
        # SLURM_STEP_ID: a plain `python launch/pretrain.py` there is one process, not rank 0 of N.
        le = _from_slurm(env)
    elif any(k in env for k in _MPI_MARKERS) and (le := _from_mpi4py(env)) is not None:
        pass
    else:
        port = _int(env, "MASTER_PORT", default=0) or _free_port(LOOPBACK)
        le = LaunchEnv("single", 0, 1, 0, 1, env.get("MASTER_ADDR") or LOOPBACK, port)
    if le.launcher != "srun" and env.get("SLURM_JOB_ID"):  # e.g. deepspeed/mpirun inside an sbatch job
        le.detail = ", ".join(filter(None, [le.detail, f"SLURM job {env['SLURM_JOB_ID']}" + _restart(env)]))
    _check(le)
    return le


def _check(le: LaunchEnv) -> None:
    if not (0 <= le.rank < le.world_size):
        raise LaunchError(f"{le.launcher}: rank {le.rank} is outside world size {le.world_size}")
    if not (0 <= le.local_rank < max(1, le.local_world_size)):
        raise LaunchError(f"{le.launcher}: local rank {le.local_rank} is outside local size {le.local_world_size}")
    if not (0 < le.master_port < 65536):
        raise LaunchError(f"{le.launcher}: master port {le.master_port} is not a valid port")


def _free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# thread hygiene and export

def available_cores() -> int:
    """Cores this process may run on (its affinity mask: cgroup cpusets, numactl, srun binding)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_rank(le: LaunchEnv, env: Mapping[str, str] | None = None, cores: int | None = None) -> int:
    """This rank's share of the node's cores.

    srun with `-c N` (SLURM_CPUS_PER_TASK) or a CPU binding (SLURM_CPU_BIND_TYPE) already gave
    each task its own cores; otherwise the ranks on this node share the affinity mask evenly.
    """
    env = os.environ if env is None else env
    cores = available_cores() if cores is None else cores
    if le.launcher == "srun":
        if env.get("SLURM_CPUS_PER_TASK", "").isdigit():
            return max(1, min(int(env["SLURM_CPUS_PER_TASK"]), cores))
        if env.get("SLURM_CPU_BIND_TYPE", "none").split(",")[0].rstrip(":") not in ("", "none"):
            return cores
    return max(1, cores // max(1, le.local_world_size))


def apply_thread_hygiene(le: LaunchEnv) -> int:
    """OMP_NUM_THREADS = this rank's share of the cores, only when the user has not set it.

    Also applies it to torch when torch is already imported (its pool was sized at import).
    """
    if not os.environ.get("OMP_NUM_THREADS"):
        os.environ["OMP_NUM_THREADS"] = str(threads_per_rank(le))
    n = int(os.environ["OMP_NUM_THREADS"])
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    return n


def export(le: LaunchEnv) -> None:
    os.environ.update(RANK=str(le.rank), WORLD_SIZE=str(le.world_size), LOCAL_RANK=str(le.local_rank),
                      LOCAL_WORLD_SIZE=str(le.local_world_size), MASTER_ADDR=le.master_addr,
                      MASTER_PORT=str(le.master_port))


def discover_and_export() -> LaunchEnv:
    le = discover()
    export(le)
    return le

"""Launcher discovery from the variables each launcher really sets (copied from real runs)."""
import os
import socket
import subprocess
import sys

import pytest

from megams.distributed import launch_env as L
from megams.distributed.launch_env import LaunchError, discover, expand_nodelist, expand_tasks_per_node

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOST = socket.gethostname().split(".")[0]


# -- node lists ---------------------------------------------------------------------------------
@pytest.mark.parametrize("nodelist,hosts", [
    ("node[01-03,7],other", ["node01", "node02", "node03", "node7", "other"]),
    ("vm", ["vm"]),
    ("a,b", ["a", "b"]),
    ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),
    ("gpu[08-10]", ["gpu08", "gpu09", "gpu10"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("gpu[1-2]-ib,x[5]", ["gpu1-ib", "gpu2-ib", "x5"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad,msg", [
    ("node[1-3", "unbalanced brackets in SLURM node list 'node[1-3'"),
    ("node[3-1]", "descending range '3-1' in SLURM node list 'node[3-1]'"),
    ("node[a-b]", "bad range 'a-b' in SLURM node list 'node[a-b]'"),
])
def test_expand_nodelist_errors(bad, msg):
    with pytest.raises(LaunchError) as e:
        expand_nodelist(bad)
    assert str(e.value) == msg


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]


def test_master_for_hosts_stays_on_loopback_for_this_host():
    assert L.master_for_hosts([HOST]) == "127.0.0.1"
    assert L.master_for_hosts(["localhost"]) == "127.0.0.1"
    assert L.master_for_hosts([]) == "127.0.0.1"
    assert L.master_for_hosts(["node01", "node02"]) == "node01"
    assert L.master_for_hosts([HOST, "node02"]) == HOST


# -- launchers ------------------------------------------------------------------------------------
def test_deepspeed_launcher():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "CROSS_RANK": "1",
           "CROSS_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29511"}
    le = discover(env)
    assert (le.launcher, le.rank, le.world_size, le.local_rank, le.local_world_size) == ("deepspeed", 3, 4, 1, 2)
    assert (le.num_nodes, le.node_rank, le.master_addr, le.master_port) == (2, 1, "10.0.0.1", 29511)


def test_torchrun():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0",
           "GROUP_WORLD_SIZE": "1", "TORCHELASTIC_RUN_ID": "none", "MASTER_ADDR": "localhost",
           "MASTER_PORT": "29400"}
    le = discover(env)
    assert (le.launcher, le.rank, le.world_size, le.master_addr, le.master_port) == (
        "torchrun", 1, 2, "127.0.0.1", 29400)


def _srun_env(**kw):
    env = {"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
           "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": HOST,
           "SLURM_STEP_NODELIST": HOST, "SLURMD_NODENAME": HOST}
    env.update(kw)
    return env


def test_srun_single_node_uses_loopback_and_a_job_port():
    a, b = discover(_srun_env()), discover(_srun_env(SLURM_PROCID="0", SLURM_LOCALID="0"))
    assert (a.launcher, a.rank, a.world_size, a.local_rank, a.local_world_size) == ("srun", 1, 2, 1, 2)
    assert a.master_addr == b.master_addr == "127.0.0.1"
    assert a.master_port == b.master_port == L._port_from_id("42", 0)
    assert a.detail == "SLURM job 42 step 0"
    assert "restart 2" in discover(_srun_env(SLURM_RESTART_COUNT="2")).detail


def test_srun_multi_node_masters_on_first_host():
    env = _srun_env(SLURM_PROCID="5", SLURM_LOCALID="1", SLURM_NODEID="2", SLURM_STEP_NUM_TASKS="7",
                    SLURM_NTASKS="7", SLURM_STEP_TASKS_PER_NODE="2(x3),1", SLURM_STEP_NODELIST="gpu[01-03,7]",
                    SLURM_JOB_NODELIST="gpu[01-03,7]", SLURMD_NODENAME="gpu03")
    le = discover(env)
    assert (le.rank, le.world_size, le.local_world_size, le.num_nodes, le.node_rank) == (5, 7, 2, 4, 2)
    assert le.master_addr == "gpu01"
    assert discover({**env, "MASTER_ADDR": "10.1.1.1", "MASTER_PORT": "1234"}).master_addr == "10.1.1.1"


def test_sbatch_shell_without_srun_is_one_process():
    # the batch script itself has SLURM_PROCID=0 and SLURM_NTASKS=2, but no step
    env = {k: v for k, v in _srun_env(SLURM_PROCID="0").items() if not k.startswith("SLURM_STEP")}
    le = discover(env)
    assert (le.launcher, le.world_size, le.master_addr) == ("single", 1, "127.0.0.1")


def _ompi_env(rank, **kw):
    env = {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": str(rank),
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_MCA_orte_num_nodes": "1",
           "OMPI_MCA_ess_base_jobid": "2137718785", "PMIX_RANK": str(rank)}
    env.update(kw)
    return env


def test_openmpi_single_node():
    a, b = discover(_ompi_env(0)), discover(_ompi_env(1))
    assert (b.launcher, b.rank, b.world_size, b.local_rank, b.local_world_size) == ("mpirun", 1, 2, 1, 2)
    assert a.master_addr == b.master_addr == "127.0.0.1"
    assert a.master_port == b.master_port == L._port_from_id("2137718785")


def test_openmpi_wins_over_the_surrounding_slurm_job():
    le = discover({**_srun_env(), **_ompi_env(0)})
    assert (le.launcher, le.rank) == ("mpirun", 0)


def test_openmpi_multi_node_needs_a_master(monkeypatch):
    env = _ompi_env(3, OMPI_COMM_WORLD_SIZE="4", OMPI_MCA_orte_num_nodes="2", OMPI_COMM_WORLD_LOCAL_RANK="1")
    assert discover({**env, "MASTER_ADDR": "node01"}).master_addr == "node01"
    monkeypatch.setattr(L, "_mpi4py", lambda: None)
    with pytest.raises(LaunchError) as e:
        discover(env)
    assert str(e.value) == ("a multi-node MPI job needs MASTER_ADDR (mpirun -x MASTER_ADDR=<first host>) "
                            "or mpi4py installed to find rank 0's host")


def test_pmi_mpich():
    env = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2", "PMI_JOBID": "77"}
    le = discover(env)
    assert (le.launcher, le.rank, le.world_size, le.local_rank, le.master_addr) == ("mpirun", 1, 2, 1, "127.0.0.1")
    assert le.master_port == L._port_from_id("77")


def test_mpi4py_fallback(monkeypatch):
    class Comm:
        def Get_rank(self): return 0
        def Get_size(self): return 1
        def allgather(self, x): return [x]
        def bcast(self, x, root=0): return x
        def Split_type(self, kind): return Local()

    class Local:
        def Get_rank(self): return 0
        def Get_size(self): return 1
        def Free(self): pass

    class MPI:
        COMM_WORLD = Comm()
        COMM_TYPE_SHARED = 1
        @staticmethod
        def Get_library_version(): return "Some MPI 1.0\n"

    monkeypatch.setattr(L, "_mpi4py", lambda: MPI)
    le = discover({"PMI_FD": "5"})  # an MPI launcher we have no variables for
    assert (le.launcher, le.rank, le.world_size, le.master_addr, le.detail) == (
        "mpi4py", 0, 1, "127.0.0.1", "Some MPI 1.0")


def test_no_launcher():
    le = discover({})
    assert (le.launcher, le.rank, le.world_size, le.master_addr) == ("single", 0, 1, "127.0.0.1")
    assert 0 < le.master_port < 65536


@pytest.mark.parametrize("env,msg", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, "env: rank 2 is outside world size 2"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
])
def test_inconsistent_variables(env, msg):
    with pytest.raises(LaunchError) as e:
        discover(env)
    assert str(e.value) == msg


def test_describe_is_one_line():
    line = discover(_srun_env(SLURM_PROCID="0", SLURM_LOCALID="0")).describe()
    assert "\n" not in line
    assert line.startswith("[megams] launcher=srun (SLURM job 42 step 0) world=2 nodes=1 ranks/node=2 rank=0 ")
    assert f"master=127.0.0.1:{L._port_from_id('42', 0)}" in line


def test_export_sets_torch_variables(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    L.export(discover(_srun_env()))
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == ("1", "2", "127.0.0.1")


# -- threads ----------------------------------------------------------------------------------------
def test_threads_per_rank():
    le = discover(_srun_env())
    assert L.threads_per_rank(le, env={}, cores=8) == 4
    assert L.threads_per_rank(le, env={}, cores=1) == 1
    assert L.threads_per_rank(le, env={"SLURM_CPUS_PER_TASK": "3"}, cores=8) == 3
    assert L.threads_per_rank(le, env={"SLURM_CPU_BIND_TYPE": "mask_cpu:"}, cores=2) == 2
    assert L.threads_per_rank(le, env={"SLURM_CPU_BIND_TYPE": "none"}, cores=8) == 4
    assert L.threads_per_rank(discover(_ompi_env(0)), env={}, cores=16) == 8


def test_apply_thread_hygiene_respects_the_user(monkeypatch):
    le = discover(_ompi_env(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert L.apply_thread_hygiene(le) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    n = L.apply_thread_hygiene(le)
    assert n == max(1, L.available_cores() // 2) and os.environ["OMP_NUM_THREADS"] == str(n)


# -- hostfile -------------------------------------------------------------------------------------
def _hostfile_cli(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "slurm", "nodelist_to_hostfile.py"), *args],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=60)


def test_nodelist_to_hostfile(tmp_path):
    out = tmp_path / "hostfile"
    p = _hostfile_cli("--slots", "8", "-o", str(out), env={"SLURM_JOB_NODELIST": "node[01-03,7],other"})
    assert p.returncode == 0, p.stderr
    assert out.read_text() == "".join(f"{h} slots=8\n" for h in ["node01", "node02", "node03", "node7", "other"])
    p = _hostfile_cli("--nodelist", "gpu[1-2]", env={"SLURM_GPUS_ON_NODE": "4"})
    assert p.stdout == "gpu1 slots=4\ngpu2 slots=4\n"
    assert _hostfile_cli("--nodelist", HOST, "--master").stdout == "127.0.0.1\n"
    assert _hostfile_cli("--nodelist", "gpu[1-2]", "--master").stdout == "gpu1\n"


def test_nodelist_to_hostfile_errors():
    p = _hostfile_cli("--nodelist", "gpu[1-2]", env={"SLURM_GPUS_ON_NODE": ""})
    assert (p.returncode, p.stderr) == (2, "error: --slots N is needed (no $SLURM_GPUS_ON_NODE in this job)\n")
    p = _hostfile_cli("--nodelist", "gpu[2-1]", "--slots", "1")
    assert (p.returncode, p.stderr) == (2, "error: descending range '2-1' in SLURM node list 'gpu[2-1]'\n")

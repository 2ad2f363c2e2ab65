"""A real single-node SLURM cluster (munged + slurmctld + slurmd) for the launch tests.

    cluster = start()            # private dirs under /tmp, loopback, free non-default ports
    cluster.run(["sbatch", ...])  # every client command gets SLURM_CONF from cluster.env
    stop(cluster)                 # kills the three daemons by PID and removes the directory

Debian's slurm-wlm 22.05 + munge, started as root without systemd (see
../shared/docs/ENVIRONMENT.md). Nothing listens off loopback: the node is this host with
NodeAddr=127.0.0.1, munged has its own socket and key copy, and every state/spool/log/pid path
is private, so a second cluster (or a system one) on the same machine does not interfere.
Run as a script for manual use: `python tests/launch/slurm_cluster.py start|stop DIR`.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")
SBIN = ("/usr/sbin", "/usr/bin")


class ClusterError(RuntimeError):
    pass


def _which(name: str) -> str | None:
    return shutil.which(name) or next((os.path.join(d, name) for d in SBIN
                                       if os.access(os.path.join(d, name), os.X_OK)), None)


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if _which(b) is None]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SlurmCluster:
    root: str
    node: str
    env: dict
    pids: dict = field(default_factory=dict)

    @property
    def conf(self) -> str:
        return os.path.join(self.root, "slurm.conf")

    def run(self, cmd: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster; raise with its output on failure."""
        p = subprocess.run(cmd, env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True,
                           timeout=timeout, **kw)
        if check and p.returncode:
            raise ClusterError(f"{' '.join(cmd)} exited {p.returncode}: {p.stdout}{p.stderr}")
        return p

    def job_field(self, job_id: int, name: str) -> str | None:
        """One field of `scontrol show job` (e.g. JobState, Restarts, ExitCode); None once purged."""
        p = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False)
        if p.returncode:
            return None
        for tok in p.stdout.split():
            if tok.startswith(name + "="):
                return tok.split("=", 1)[1]
        return None

    def wait_job(self, job_id: int, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                            "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"),
                 timeout: float = 120, poll: float = 0.2) -> str:
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.job_field(job_id, "JobState")
            if state in states:
                return state
            time.sleep(poll)
        raise ClusterError(f"job {job_id} still {state} after {timeout}s\n{self.logs()}")

    def logs(self, tail: int = 30) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = os.path.join(self.root, "log", name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    out.append(f"--- {name} (last {tail} lines)\n" + "".join(f.readlines()[-tail:]))
        return "\n".join(out)


def _write_conf(root: str, node: str, cpus: int, ctld_port: int, slurmd_port: int, socket_path: str) -> str:
    d = lambda *p: os.path.join(root, *p)  # noqa: E731
    conf = f"""\
# written by tests/launch/slurm_cluster.py: a private single-node cluster on loopback
ClusterName=megamstest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again only cred_expire+1 s later (default 120 s)
AuthInfo=socket={socket_path},cred_expire=5
StateSaveLocation={d('state')}
SlurmdSpoolDir={d('spool', '%n')}
SlurmctldPidFile={d('run', 'slurmctld.pid')}
SlurmdPidFile={d('run', 'slurmd.pid')}
SlurmctldLogFile={d('log', 'slurmctld.log')}
SlurmdLogFile={d('log', 'slurmd.log')}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# run the main scheduling loop every second (default 60 s): a requeued job restarts promptly
SchedulerParameters=sched_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
PlugStackConfig={d('plugstack.conf')}
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName={node} NodeAddr=127.0.0.1 NodeHostname={socket.gethostname()} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
    path = d("slurm.conf")
    with open(path, "w") as f:
        f.write(conf)
    open(d("plugstack.conf"), "w").close()
    return path


def _start_daemon(cmd: list[str], env: dict, log: str) -> subprocess.Popen:
    out = open(log, "ab")
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def start(root: str | None = None, timeout: float = 30.0) -> SlurmCluster:
    """Start munged, slurmctld and slurmd; return once the node is idle and accepts jobs."""
    missing = missing_binaries()
    if missing:
        raise ClusterError(f"SLURM/munge binaries missing: {', '.join(missing)} (run .ci/install_cluster_deps.sh)")
    if os.geteuid() != 0:
        raise ClusterError("the test cluster runs slurmd as root; run the tests as root")
    root = root or tempfile.mkdtemp(prefix="megams-slurm-", dir="/tmp")
    for sub in ("munge", "state", "spool", "log", "run"):
        os.makedirs(os.path.join(root, sub), mode=0o700, exist_ok=True)
    os.chmod(root, 0o755)
    node = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    sock = os.path.join(root, "munge", "munge.socket")
    key = os.path.join(root, "munge", "munge.key")
    with open(key, "wb") as f:  # a fresh key: never touch /etc/munge
        f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    conf = _write_conf(root, node, cpus, _free_port(), _free_port(), sock)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["SLURM_CONF"] = conf
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin"
    cluster = SlurmCluster(root=root, node=node, env=env)
    log = lambda n: os.path.join(root, "log", n)  # noqa: E731
    try:
        munged = _start_daemon([_which("munged"), "-F", "-f", f"--socket={sock}", f"--key-file={key}",
                                f"--pid-file={os.path.join(root, 'run', 'munged.pid')}",
                                f"--seed-file={os.path.join(root, 'munge', 'munged.seed')}",
                                f"--log-file={log('munged.log')}"], env, log("munged.out"))
        cluster.pids["munged"] = munged.pid
        _wait(lambda: os.path.exists(sock), 10, "munged socket", cluster, munged)
        ctld = _start_daemon([_which("slurmctld"), "-D", "-i", "-f", conf], env, log("slurmctld.out"))
        cluster.pids["slurmctld"] = ctld.pid
        _wait(lambda: cluster.run(["scontrol", "ping"], check=False).stdout.count("is UP") > 0, timeout,
              "slurmctld to answer", cluster, ctld)
        slurmd = _start_daemon([_which("slurmd"), "-D", "-N", node, "-f", conf], env, log("slurmd.out"))
        cluster.pids["slurmd"] = slurmd.pid
        _wait(lambda: "idle" in cluster.run(["sinfo", "-h", "-N", "-o", "%t"], check=False).stdout, timeout,
              "the node to become idle", cluster, slurmd)
    except BaseException:
        stop(cluster, remove=False)
        raise
    with open(os.path.join(root, "run", "pids"), "w") as f:
        f.write("\n".join(f"{k} {v}" for k, v in cluster.pids.items()) + "\n")
    return cluster


def _wait(cond, timeout: float, what: str, cluster: SlurmCluster, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ClusterError(f"{os.path.basename(proc.args[0])} exited {proc.returncode} while waiting for "
                               f"{what}\n{cluster.logs()}")
        try:
            if cond():
                return
        except subprocess.TimeoutExpired:
            pass
        time.sleep(0.1)
    raise ClusterError(f"timed out after {timeout}s waiting for {what}\n{cluster.logs()}")


def stop(cluster: SlurmCluster, remove: bool = True, grace: float = 5.0) -> None:
    """Cancel leftover jobs, stop the daemons by PID (slurmd, slurmctld, munged), remove the dir."""
    if cluster.pids.get("slurmctld"):
        try:
            cluster.run(["scancel", "--full", "--user", "root"], check=False, timeout=10)
        except (subprocess.TimeoutExpired, OSError):
            pass
    for name in ("slurmd", "slurmctld", "munged"):
        pid = cluster.pids.get(name)
        if not pid:
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not our child (script mode): poll for the PID instead
                done = 0 if _alive(pid) else pid
            if done:
                break
            time.sleep(0.05)
        else:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
    cluster.pids.clear()
    if remove:
        shutil.rmtree(cluster.root, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _main(argv: list[str]) -> int:
    if argv[:1] == ["start"]:
        c = start(argv[1] if len(argv) > 1 else None)
        print(f"export SLURM_CONF={c.conf}   # pids: {c.pids}; stop with: {sys.argv[0]} stop {c.root}")
        return 0
    if argv[:1] == ["stop"] and len(argv) == 2:
        pids = {}
        with open(os.path.join(argv[1], "run", "pids")) as f:
            for line in f:
                name, pid = line.split()
                pids[name] = int(pid)
        env = {**os.environ, "SLURM_CONF": os.path.join(argv[1], "slurm.conf")}
        stop(SlurmCluster(root=argv[1], node="", env=env, pids=pids))
        return 0
    print(f"usage: {sys.argv[0]} start [DIR] | stop DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

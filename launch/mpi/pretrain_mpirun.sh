#!/usr/bin/env bash
# megams pretraining with OpenMPI's mpirun.
#
#   launch/mpi/pretrain_mpirun.sh -n 2 -- --config configs/tiny/vanilla.yaml --set training.run_dir=runs/mpi
#   launch/mpi/pretrain_mpirun.sh -n 16 --hostfile hosts --iface eth0 -- --config ... # multi-node
#
# One node (no --hostfile): everything stays on loopback
#   (--mca btl self,vader --mca oob_tcp_if_include lo; master 127.0.0.1).
# Several nodes (--hostfile FILE, OpenMPI format `host slots=N`): MPI over TCP on --iface
# (default: OpenMPI's choice) and MASTER_ADDR = the hostfile's first host unless already set.
# Each rank reads OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}; the port is derived from
# the MPI job id (or MASTER_PORT); OMP_NUM_THREADS = cores / ranks per node when unset.
# Extra mpirun flags: MPIRUN_ARGS. Interpreter: MEGAMS_PYTHON (default .venv/bin/python).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
NP=1 HOSTFILE="" IFACE=""
usage() { echo "usage: $0 [-n NP] [--hostfile FILE] [--iface IF] -- --config FILE [--set k=v ...]" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    -n|-np|--np) NP="$2"; shift 2 ;;
    --hostfile) HOSTFILE="$2"; shift 2 ;;
    --iface) IFACE="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || usage
PY="${MEGAMS_PYTHON:-$ROOT/.venv/bin/python}"
command -v mpirun >/dev/null || { echo "error: mpirun not found (apt-get install openmpi-bin)" >&2; exit 2; }

ARGS=(-np "$NP" --bind-to none)
[ "$(id -u)" -ne 0 ] || ARGS+=(--allow-run-as-root)
if [ -z "$HOSTFILE" ]; then
  ARGS+=(--mca btl self,vader --mca oob_tcp_if_include lo)
  export MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
else
  ARGS+=(--hostfile "$HOSTFILE" --mca btl self,vader,tcp)
  [ -z "$IFACE" ] || ARGS+=(--mca oob_tcp_if_include "$IFACE" --mca btl_tcp_if_include "$IFACE")
  # first host of the hostfile (127.0.0.1 when it lists only this host)
  HOSTS="$(awk '!/^[[:space:]]*(#|$)/ {printf "%s%s", sep, $1; sep=","}' "$HOSTFILE")"
  export MASTER_ADDR="${MASTER_ADDR:-$("$PY" "$ROOT/launch/slurm/nodelist_to_hostfile.py" --nodelist "$HOSTS" --master)}"
fi
# forward what the ranks need; remote nodes do not inherit this shell's environment
for var in MASTER_ADDR MASTER_PORT OMP_NUM_THREADS DS_ACCELERATOR TORCH_EXTENSIONS_DIR PYTHONPATH \
           PYTHONWARNINGS CUDA_VISIBLE_DEVICES GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME; do
  [ -z "${!var:-}" ] || ARGS+=(-x "$var")
done
cd "$ROOT"
echo "[megams-mpirun] mpirun ${ARGS[*]} ${MPIRUN_ARGS:-} $PY -u launch/pretrain.py $*"
exec mpirun "${ARGS[@]}" ${MPIRUN_ARGS:-} "$PY" -u launch/pretrain.py "$@"

#!/usr/bin/env python
"""Turn a SLURM node list into a DeepSpeed hostfile (`host slots=N`, one line per node).

    python launch/slurm/nodelist_to_hostfile.py --slots 8 -o hostfile      # $SLURM_JOB_NODELIST
    python launch/slurm/nodelist_to_hostfile.py --nodelist 'gpu[01-03,7]' --slots 8
    python launch/slurm/nodelist_to_hostfile.py --master                   # rendezvous address

Slots default to $SLURM_GPUS_ON_NODE (what `--gpus-per-node` gave the job). `--master` prints
the address every node's launcher should use: 127.0.0.1 when the list is only this host,
otherwise its first host.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megams.distributed.launch_env import LaunchError, expand_nodelist, master_for_hosts  # noqa: E402


def hostfile_text(nodelist: str, slots: int) -> str:
    return "".join(f"{host} slots={slots}\n" for host in expand_nodelist(nodelist))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodelist", default=os.environ.get("SLURM_JOB_NODELIST"),
                   help="SLURM node list (default: $SLURM_JOB_NODELIST)")
    p.add_argument("--slots", type=int, default=None,
                   help="ranks per node (default: $SLURM_GPUS_ON_NODE)")
    p.add_argument("-o", "--output", default="-", help="hostfile to write (default: stdout)")
    p.add_argument("--master", action="store_true", help="print the master address instead of a hostfile")
    a = p.parse_args(argv)
    if not a.nodelist:
        print("error: no node list: pass --nodelist or run inside a SLURM job", file=sys.stderr)
        return 2
    try:
        if a.master:
            print(master_for_hosts(expand_nodelist(a.nodelist)))
            return 0
        slots = a.slots
        if slots is None and os.environ.get("SLURM_GPUS_ON_NODE", "").isdigit():
            slots = int(os.environ["SLURM_GPUS_ON_NODE"])
        if not slots or slots < 1:
            print("error: --slots N is needed (no $SLURM_GPUS_ON_NODE in this job)", file=sys.stderr)
            return 2
        text = hostfile_text(a.nodelist, slots)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.output == "-":
        sys.stdout.write(text)
    else:
        tmp = a.output + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, a.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())

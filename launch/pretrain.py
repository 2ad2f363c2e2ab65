#!/usr/bin/env python
"""Pretrain a megams model: python launch/pretrain.py --config configs/tiny/bottom_up.yaml [--set k=v ...]

Works as a plain process, under torchrun, under `deepspeed` (accepts --local_rank), srun and mpirun.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megams.training.trainer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

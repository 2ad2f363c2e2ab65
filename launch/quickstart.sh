#!/usr/bin/env bash
# README's first command: install (idempotent), then a short real pretraining run of the tiny
# bottom-up model on the built-in corpus (Python's own documentation text: no download).
# Running it again resumes the run directory (and exits at once when it is complete).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tools/setup_env.sh
export DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$PWD/.venv/torch_extensions" PYTHONWARNINGS="ignore::FutureWarning"
.venv/bin/python tools/prebuild_ops.py
exec .venv/bin/python launch/pretrain.py --config configs/tiny/bottom_up.yaml "$@"

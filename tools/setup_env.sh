#!/usr/bin/env bash
# Create (or reuse) the project virtualenv at .venv and install megams' dependencies.
# Safe to repeat: it re-installs only when requirements.txt, constraints.txt or requirements-test.txt changed.
# torch is installed first and pinned (constraints.txt): an unpinned torch, pulled in by
# deepspeed, would download a multi-GB CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEGAMS_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.megams-installed"
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/constraints.txt" "$ROOT/requirements-test.txt" | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  echo "[setup] dependencies up to date in $VENV"
else
  echo "[setup] installing dependencies into $VENV (about a minute)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q torch==2.13.0
  DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements.txt" -c "$ROOT/constraints.txt"
  # test-only (the Megatron dataset reference): without their dependencies, which would replace torch
  "$VENV/bin/python" -m pip install -q --no-deps -r "$ROOT/requirements-test.txt"
  echo "$WANT" > "$STAMP"
fi

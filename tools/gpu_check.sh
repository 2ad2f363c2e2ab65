#!/usr/bin/env bash
# One-script GPU check of megams' CUDA path (under 8 minutes on one GPU).
#
#   bash tools/gpu_check.sh             # on a machine with a CUDA GPU
#   bash tools/gpu_check.sh --dry-run   # anywhere: list every command, validate every config override
#   bash tools/gpu_check.sh --full      # every model x {bf16, fp16} x ZeRO {0,1,2,3} (not only pairwise)
#
# What it runs (each step timed, pass/fail recorded):
#   - each of the four tiny models (configs/tiny/*.yaml): 20 steps of launch/pretrain.py under the
#     DeepSpeed launcher on CUDA + NCCL, in bf16 and in fp16 (dynamic loss scaling); ZeRO 0/1/2/3 are
#     spread over the runs so that every stage runs in both precisions (--full: all 32 runs);
#   - the bf16 run's step-20 checkpoint converted to plain torch (tools/convert_checkpoint.py) and
#     evaluated by tools/evaluate.py on the run's validation windows: loss equal to the trainer's val_loss;
#   - a resume (the bf16 run continued to step 30 from that checkpoint);
#   - tp=2 and pp=2: two ranks on the one GPU over gloo (torchrun; NCCL refuses two ranks per device);
#   - the `gpu` pytest marker (pytest -m gpu);
#   - vanilla d=2048 bf16 tokens/s and MFU against the datasheet peak (tools/benchmark_gpu.py);
#   - tokens/s of the tiny bottom-up config with the batch prefetcher off and on (benchmark.py prefetch).
# Results: $OUT/gpu_check.md (table) and $OUT/gpu_check.json when OUT is set, else under $WORK.
# Env: PYTHON (default .venv/bin/python, else python), WORK (scratch, default /tmp/megams-gpu-check),
# BUDGET_S (default 450: steps that would start later are recorded as skipped).
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=0
FULL=0
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    --full) FULL=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "error: gpu_check.sh: unknown argument $a (expected --dry-run, --full)" >&2; exit 2 ;;
  esac
done

if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python; fi
fi
WORK=${WORK:-/tmp/megams-gpu-check}
RESULTS=${OUT:-$WORK}
BUDGET_S=${BUDGET_S:-450}
STEPS=20
mkdir -p "$WORK" "$RESULTS"
LOG="$WORK/steps.jsonl"
: > "$LOG"
VALIDATE="$WORK/overrides.txt"   # dry run: config|override|override... per pretrain command
: > "$VALIDATE"
export PYTHONWARNINGS=ignore::FutureWarning OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$ROOT/.venv/torch_extensions}
if [ $DRY = 0 ]; then
  unset DS_ACCELERATOR  # the GPU run: DeepSpeed's CUDA accelerator
  if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: gpu_check.sh: no CUDA device visible to $PYTHON (use --dry-run to list the commands)" >&2
    exit 2
  fi
fi
START=$(date +%s)
PORT=$((29500 + RANDOM % 1000))

# record NAME RC SECONDS DETAIL
record() {
  "$PYTHON" - "$LOG" "$@" <<'EOF'
import json, sys
log, name, rc, secs, detail = sys.argv[1:6]
with open(log, "a") as f:
    f.write(json.dumps({"step": name, "rc": int(rc), "seconds": float(secs), "detail": detail}) + "\n")
EOF
}

# step NAME CMD... : run (or, in the dry run, print) one command; its output in $WORK/logs/NAME.log
step() {
  local name=$1; shift
  echo "+ [$name] $*"
  if [ $DRY = 1 ]; then return 0; fi
  local now; now=$(date +%s)
  if [ $((now - START)) -gt "$BUDGET_S" ]; then
    record "$name" 124 0 "skipped: past the ${BUDGET_S}s budget"
    return 1
  fi
  mkdir -p "$WORK/logs"
  local t0 rc; t0=$(date +%s%N)
  "$@" > "$WORK/logs/$name.log" 2>&1
  rc=$?
  local secs; secs=$(( ($(date +%s%N) - t0) / 1000000 ))e-3
  local detail; detail=$(tail -n 1 "$WORK/logs/$name.log" | cut -c1-200)
  [ $rc = 0 ] || detail="FAILED: $(grep -E 'error|Error' "$WORK/logs/$name.log" | tail -n 1 | cut -c1-200)"
  record "$name" "$rc" "$secs" "$detail"
  return $rc
}

# check NAME PYTHON-EXPRESSION-SCRIPT ARGS... : a verification (no GPU work), recorded like a step
check() {
  local name=$1 script=$2; shift 2
  echo "+ [$name] check: $script $*"
  if [ $DRY = 1 ]; then return 0; fi
  local out rc
  out=$("$PYTHON" "$ROOT/tools/gpu_check_verify.py" "$script" "$@" 2>&1); rc=$?
  record "$name" "$rc" 0 "$(echo "$out" | tail -n 1 | cut -c1-200)"
  return $rc
}

# pretrain LAUNCH NAME CONFIG OVERRIDES... (LAUNCH: ds1 = DeepSpeed launcher, 1 GPU, NCCL; gloo2 = torchrun, 2 ranks, gloo)
pretrain() {
  local launch=$1 name=$2 config=$3; shift 3
  local sets=() o
  for o in "$@"; do sets+=(--set "$o"); done
  printf '%s' "$config" >> "$VALIDATE"; for o in "$@"; do printf '|%s' "$o" >> "$VALIDATE"; done; echo >> "$VALIDATE"
  PORT=$((PORT + 1))
  if [ "$launch" = ds1 ]; then
    step "$name" "$PYTHON" -m deepspeed.launcher.runner --num_gpus 1 --master_port $PORT \
      launch/pretrain.py --config "$config" "${sets[@]}"
  else
    step "$name" "$PYTHON" -m torch.distributed.run --nproc_per_node 2 --master_port $PORT \
      launch/pretrain.py --config "$config" "${sets[@]}"
  fi
}

common() {  # RUN [MAX_STEPS]: the overrides every run shares: one evaluation and one checkpoint at the end
  echo "training.max_steps=${2:-$STEPS}" "training.eval_interval=0" "training.eval_batches=2" \
       "checkpoint.interval=$STEPS" "logging.progress_bar=false" "training.run_dir=$WORK/runs/$1"
}

MODELS=(vanilla bottom_up top_down retina)
if [ $FULL = 1 ]; then
  CASES=()
  for m in "${MODELS[@]}"; do for p in bf16 fp16; do for z in 0 1 2 3; do CASES+=("$m $p $z"); done; done; done
else  # pairwise: every model in both precisions, every ZeRO stage in both precisions
  CASES=("vanilla bf16 0" "vanilla fp16 1" "bottom_up bf16 1" "bottom_up fp16 2"
         "top_down bf16 2" "top_down fp16 3" "retina bf16 3" "retina fp16 0")
fi

for c in "${CASES[@]}"; do
  read -r m p z <<< "$c"
  name="${m}_${p}_z${z}"
  cfg="configs/tiny/$m.yaml"
  # shellcheck disable=SC2046
  pretrain ds1 "$name" "$cfg" $(common "$name") "training.precision=$p" "parallel.zero_stage=$z" \
    "training.device=cuda" "training.dist_backend=nccl"
  check "$name.metrics" metrics "$WORK/runs/$name" "$STEPS"
  if [ "$p" = bf16 ]; then
    # the step-20 checkpoint converted to plain torch: its loss on the run's validation windows
    rm -rf "$WORK/exported/$name"
    step "$name.convert" "$PYTHON" tools/convert_checkpoint.py "$WORK/runs/$name" "$WORK/exported/$name"
    dtype=(--autocast-bf16); [ "$z" != 0 ] && dtype=(--dtype bf16)
    step "$name.evaluate" "$PYTHON" tools/evaluate.py "$WORK/exported/$name" --data builtin --part valid \
      --stride 257 --max-windows 32 "${dtype[@]}" --output "$WORK/eval_$name.json"
    check "$name.loss_equal" loss_equal "$WORK/eval_$name.json" "$WORK/runs/$name" 2e-2
    # resume: the same run continued to step 30 from its step-20 checkpoint
    # shellcheck disable=SC2046
    pretrain ds1 "$name.resume" "$cfg" $(common "$name" $((STEPS + 10))) \
      "training.precision=$p" "parallel.zero_stage=$z" "training.device=cuda" "training.dist_backend=nccl"
    check "$name.resumed" resumed "$WORK/logs/$name.resume.log" "$WORK/runs/$name" "$((STEPS + 10))"
  fi
done

# two ranks on the one GPU over gloo
# shellcheck disable=SC2046
pretrain gloo2 bottom_up_tp2 configs/tiny/bottom_up.yaml $(common bottom_up_tp2) "parallel.tensor=2" \
  "training.precision=bf16" "training.device=cuda" "training.dist_backend=gloo"
check bottom_up_tp2.metrics metrics "$WORK/runs/bottom_up_tp2" "$STEPS"
# shellcheck disable=SC2046
pretrain gloo2 vanilla_pp2 configs/tiny/vanilla.yaml $(common vanilla_pp2) "parallel.pipeline=2" \
  "training.precision=bf16" "training.device=cuda" "training.dist_backend=gloo"
check vanilla_pp2.metrics metrics "$WORK/runs/vanilla_pp2" "$STEPS"

step pytest_gpu "$PYTHON" -m pytest -m gpu tests -q
step mfu_d2048 "$PYTHON" tools/benchmark_gpu.py --sizes d2048 --models vanilla --out "$WORK/bench_gpu.json"
check mfu_d2048.report mfu "$WORK/bench_gpu.json"
step prefetch_cuda "$PYTHON" tools/benchmark.py prefetch --device cuda --steps 20 --rounds 3 --threads 4 \
  --out "$WORK/prefetch"

if [ $DRY = 1 ]; then
  echo "+ validating the overrides of every pretrain command against the config schema"
  "$PYTHON" "$ROOT/tools/gpu_check_verify.py" overrides "$VALIDATE" || exit 1
  echo "dry run: $(grep -c . "$VALIDATE") pretrain commands; nothing was run"
  exit 0
fi
"$PYTHON" "$ROOT/tools/gpu_check_verify.py" report "$LOG" "$RESULTS/gpu_check.md" "$RESULTS/gpu_check.json" \
  "$WORK/bench_gpu.json"

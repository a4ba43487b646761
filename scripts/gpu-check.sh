#!/usr/bin/env bash
# The GPU check, in two halves: build on a machine with Rust, run on any Linux machine with an
# NVIDIA GPU (driver, CUDA toolkit with NVRTC, and Python with torch, transformers and peft; no
# Rust, no network).
#
#   scripts/gpu-check.sh build           # builds target/release/coserve
#   scripts/gpu-check.sh run [BINARY]    # nvidia-smi, kernels check, selftest, serve, benchmarks
#
# `run` writes its results to $OUT (default gpu-results/): nvidia-smi.txt, environment.txt,
# kernels-check.txt, ptxas.txt, selftest.json, bench-decode.json, bandwidth.json,
# bench-finetune.json, hf-peft.json, serve-llama.json and serve-qwen2.json (with the servers'
# logs), and a log per step. It goes on after a failed step and exits non-zero if any failed.
# The benchmarks print each number on their log as soon as it is measured. The toolkit is found
# at $CUDA_HOME, $CUDA_PATH or /usr/local/cuda.
#
#   BUDGET_S=400   end every step by then (seconds from the start): each step's time limit is
#                  cut to what is left, and a step with under 15 s left is skipped (a failure)
#   ONLY="bench-decode bench-finetune"   run only these steps (a rerun of what is missing; the
#                  serve checks are serve-llama and serve-qwen2)
set -uo pipefail
cd "$(dirname "$0")/.."

case "${1:-run}" in
build)
  cargo build --release
  ls -l target/release/coserve
  ;;
run)
  BIN=${2:-target/release/coserve}
  OUT=${OUT:-gpu-results}
  PYTHON=${PYTHON:-python3}
  mkdir -p "$OUT"
  failed=0
  if [ -n "${BUDGET_S:-}" ] && ! [[ $BUDGET_S =~ ^[0-9]+$ ]]; then
    echo "BUDGET_S=$BUDGET_S is not a number of seconds" >&2
    exit 2
  fi
  # The steps ONLY let through, to catch a name in ONLY that is no step.
  seen=" "
  # step NAME OUTFILE LIMIT COMMAND...: runs COMMAND for at most LIMIT seconds (less if the
  # budget has less left) with stdout to OUTFILE and stderr to NAME.log. Every step has a
  # time limit, so one that hangs leaves time for the others.
  step() {
    local name=$1 out=$2 limit=$3
    shift 3
    if [ -n "${ONLY:-}" ] && [[ " ${ONLY//,/ } " != *" $name "* ]]; then
      return
    fi
    seen+="$name "
    echo "== $name"
    if [ -n "${BUDGET_S:-}" ]; then
      local left=$((BUDGET_S - SECONDS))
      if [ "$left" -lt 15 ]; then
        echo "$name: skipped, $left s of the budget left"
        failed=1
        return
      fi
      [ "$left" -lt "$limit" ] && limit=$left
    fi
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out" 2>"$OUT/$name.log"
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 124 ] && echo "$name: stopped at its limit of $limit s"
    tail -n 40 "$out" "$OUT/$name.log"
    [ "$rc" -eq 0 ] || failed=1
  }

  # No toolkit at $CUDA_HOME, $CUDA_PATH or /usr/local/cuda: take the one PyPI's CUDA 13
  # packages put next to Python's torch, if there is one.
  if [ -z "${CUDA_HOME:-}${CUDA_PATH:-}" ] && [ ! -e /usr/local/cuda/include/cuda_bf16.h ]; then
    pypi_cuda=$("$PYTHON" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))' 2>/dev/null)
    [ -n "$pypi_cuda" ] && [ -e "$pypi_cuda/include/cuda_bf16.h" ] && export CUDA_HOME=$pypi_cuda
  fi

  step nvidia-smi "$OUT/nvidia-smi.txt" 60 nvidia-smi
  step environment "$OUT/environment.txt" 60 bash -c '
    echo "CUDA_HOME=${CUDA_HOME:-} CUDA_PATH=${CUDA_PATH:-}"; uname -a; nproc
    command -v nvcc && nvcc --version
    for d in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
      [ -d "$d" ] && ls -l "$d"/lib64/ "$d"/lib/ 2>/dev/null | grep -E "nvrtc|cublas"
    done
    true'
  step kernels-check "$OUT/kernels-check.txt" 240 "$BIN" kernels check --ptx-dir "$OUT/ptx"
  # Registers, spills and shared memory of every kernel as ptxas builds the checked PTX for
  # this GPU's architecture (the driver builds the same PTX at load), for reading the timings.
  step ptxas "$OUT/ptxas.txt" 60 bash -c '
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ". ")
    ptxas=$(command -v ptxas || echo "${CUDA_HOME:-${CUDA_PATH:-/usr/local/cuda}}/bin/ptxas")
    [ -x "$ptxas" ] || { echo "no ptxas: skipped"; exit 0; }
    for f in "$1"/ptx/*-sm_"$cap".ptx; do
      [ -e "$f" ] || { echo "no PTX for sm_$cap: skipped"; exit 0; }
      "$ptxas" -arch=sm_"$cap" -v "$f" -o /dev/null 2>&1 | grep -E "entry function|Used|spill"
    done' _ "$OUT"
  step selftest "$OUT/selftest.txt" 240 "$BIN" selftest --device cuda \
    --json "$OUT/selftest.json"

  # Decode steps of Llama-3-8B-shaped random bf16 weights made on the device, context 1024,
  # next to the bandwidth floor (bytes of weights and K/V read / device-to-device copy rate).
  step bench-decode "$OUT/bench-decode.json" 240 "$BIN" bench-decode --device cuda \
    --dummy-weights llama-3-8b --batch 1,16,64,256 --context 1024 --steps 10 --json

  # Device-to-device copy bandwidth as PyTorch measures it, beside coserve's own measurement.
  step bandwidth "$OUT/bandwidth.json" 120 "$PYTHON" - <<'PY'
import json, statistics, torch
n = 1 << 30
a = torch.empty(n, dtype=torch.uint8, device="cuda")
b = torch.empty_like(a)
for _ in range(3):
    b.copy_(a)
torch.cuda.synchronize()
times = []
for _ in range(20):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record(); b.copy_(a); e.record(); e.synchronize()
    times.append(s.elapsed_time(e) / 1e3)
t = statistics.median(times)
# A copy reads n bytes and writes n bytes.
print(json.dumps({"device": torch.cuda.get_device_name(), "copy_bytes": n,
                  "median_s": t, "read_plus_write_bytes_per_s": 2 * n / t}))
PY

  # LoRA fine-tuning on the device, and the HF PEFT baseline of its target: Llama-3-8B shape,
  # sequence 1024, r=16, all linear projections, bf16. Then co-serving: a decode batch of 64
  # (context 1024) with the training sample's chunks in the same forwards, against the batch
  # alone; once with fixed work per iteration, once with the work sized as the engine sizes
  # it (planner and cost model) to keep the step within 1.2x of the batch's alone.
  step bench-finetune "$OUT/bench-finetune.json" 300 "$BIN" bench-finetune \
    --device cuda --dummy-weights llama-3-8b --seq-len 1024 --batch-size 1 --rank 16 \
    --alpha 32 --steps 5 --warmup-steps 2 --coserve-decode-batch 64 --context 1024 \
    --train-tokens-per-iter 128 --bwd-layers-per-iter 4 --coserve-step-target 1.2 --json

  step hf-peft "$OUT/hf-peft.json" 300 "$PYTHON" benches/hf_peft_finetune.py \
    --device cuda --dummy-shape llama-3-8b --seq-len 1024 --batch-size 1 \
    --steps 5 --warmup-steps 2 --threads 8

  # `coserve serve --device cuda` over HTTP on small random models made with transformers (a
  # Llama, and a Qwen2 with q/k/v biases) and a PEFT adapter served next to the base model,
  # every generated token scored by transformers and PEFT in f32.
  for arch in llama qwen2; do
    step "serve-$arch" "$OUT/serve-$arch.json" 300 "$PYTHON" scripts/serve_check.py \
      --bin "$BIN" --device cuda --arch "$arch" --out "$OUT"
  done

  only=${ONLY:-}
  for name in ${only//,/ }; do
    if [[ $seen != *" $name "* ]]; then
      echo "ONLY names no step: $name (steps are named as in the == lines)"
      failed=1
    fi
  done
  echo "== results in $OUT"
  ls -l "$OUT"
  exit "$failed"
  ;;
*)
  echo "usage: $0 build | run [BINARY]" >&2
  exit 2
  ;;
esac

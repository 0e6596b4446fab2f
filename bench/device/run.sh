#!/usr/bin/env bash
# There: the GPU checks in one device call, each step under its own time limit so the call ends inside the
# device's 10-minute command limit; results under $OUT (bench/results/ when $OUT is unset). CPU_CHECK=1 rehearses
# the call without a GPU (the FSDP check's --cpu-check alone). Exit 1 when a step failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
source bench/device/setup.sh > >(tee "$out/setup.log") 2>&1 || exit 1
stamp=$(mktemp)
failed=()

step() {  # step SECONDS NAME COMMAND...: the command's output goes to the terminal and to $out/NAME.log
  local limit=$1 name=$2
  shift 2
  echo "### $name: $* (limit ${limit} s)"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local code=${PIPESTATUS[0]}
  if [ "$code" -ne 0 ]; then
    echo "### $name: exit $code$([ "$code" -eq 124 ] && echo ' (out of time)')"
    failed+=("$name")
  fi
}

if [ "${CPU_CHECK:-0}" = 1 ]; then
  step 540 fsdp-cpu-check python3 bench/fsdp_gpu.py --cpu-check  # prints its table (the log) and writes no record
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
  step 330 fsdp-gpu python3 bench/fsdp_gpu.py --out "$out/fsdp-gpu.md"
  step 60 mfu python3 bench/mfu.py --quick
  step 60 inference-speed python3 bench/inference_speed.py --device cuda --random-source
fi
# records a step wrote under bench/results/ come back with $OUT too
if [ "$out" != bench/results ]; then
  find bench/results -type f -newer "$stamp" -exec cp {} "$out/" \;
fi
rm -f "$stamp"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "failed: ${failed[*]}"
  exit 1
fi
echo "every step passed; results in $out"

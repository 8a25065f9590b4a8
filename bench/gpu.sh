#!/usr/bin/env bash
# One call on a GPU machine: the kernel tests compiled for CUDA (bf16 included), then the GPU benchmarks.
#   On the device:  bash bench/gpu.sh        (OUT defaults to bench/results)
# Read bench/GPU_CHECKLIST.md first. The whole script keeps to GPU_BUDGET_S seconds of wall time (default
# 470, under 8 minutes, inside the device tool's 600 s a call): each stage has a cap and gets at most what
# is left, and the benchmarks stop starting new shapes in time to write what they measured.
# The device tool brings back at most 8 files from $OUT, so $OUT holds just gpu.log (all output) and
# gpu-results.tar.gz (JSON/Markdown/JUnit of every stage), re-packed after each stage.
# GPU_STAGES picks stages (default all, in this order: "tests profile e2e lora qmatmul fused"), e.g.
# GPU_STAGES="tests e2e" for a rerun;
# GPU_TESTS narrows the test stage (default tests/kernels).
# bitsandbytes is not on the GPU image: ../shared/tools/gpu-wheels.sh puts its wheel in .whl/ to carry.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
RES=$(mktemp -d /tmp/fusedtune-gpu.XXXXXX)
LOG="$OUT/gpu.log"
: >"$LOG"
END=$((SECONDS + ${GPU_BUDGET_S:-470}))
STAGES=" ${GPU_STAGES:-tests profile e2e lora qmatmul fused} "
want() { [[ $STAGES == *" $1 "* ]]; }
left() { echo $((END - SECONDS)); }
cap() { local l; l=$(left); if ((l < $1)); then echo "$l"; else echo "$1"; fi; }
pack() { tar -czf "$OUT/gpu-results.tar.gz" -C "$RES" . 2>>"$LOG"; }
stage() { echo "=== $* (t=${SECONDS}s, $(left)s left)" | tee -a "$LOG"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl 2>&1 | tee -a "$LOG"
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
# The repository is not pip-installed there: map the fusedtune.* names onto the source folders.
python3 - <<'PY'
import pathlib
root = pathlib.Path.cwd()
d = pathlib.Path("/tmp/ftsite/fusedtune")  # a namespace package: no __init__.py
d.mkdir(parents=True, exist_ok=True)
for name in ("kernels", "trainer"):
    link = d / name
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(root / name)
PY
export PYTHONPATH=/tmp/ftsite:${PYTHONPATH:-}

stage "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG" | tee "$RES/gpu-info.txt"
python3 -P - 2>&1 <<'PY' | tee -a "$LOG" | tee -a "$RES/gpu-info.txt"
import importlib.util, sys, torch, triton
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
for name in ("bitsandbytes", "peft", "transformers"):
    print(f"{name}: {'present' if importlib.util.find_spec(name) else 'absent'}")
import fusedtune.kernels as k
print("fusedtune.kernels from", k.__file__)
PY
pack

status=0
# Kernel tests only (trainer tests are CPU tests); no -x: one GPU run must report every failure.
# Every test shape is a fresh compile: pytest-xdist (on the GPU image) spreads the compiles over the CPUs.
if want tests; then
  stage "tests/kernels"
  par=()
  python3 -c "import xdist" 2>/dev/null && par=(-n 8)
  timeout "$(cap 150)" python3 -P -m pytest -q ${GPU_TESTS:-tests/kernels} "${par[@]}" -m "gpu or not slow" -p no:cacheprovider \
    -rfEs --durations=15 --junitxml="$RES/gpu-tests.xml" 2>&1 | tee -a "$LOG" || status=1
  pack
fi

run_bench() {  # run_bench SCRIPT CAP_S [ARGS...]: given min(CAP_S, time left), told to stop 20 s early
  local t name
  name=${1#bench/gpu_}
  want "${name%.py}" || return 0
  t=$(cap "$2")
  if ((t < 30)); then
    stage "$1 skipped: ${t}s left"
    return
  fi
  stage "$1 (${t}s) ${*:3}"
  timeout "$t" python3 -P "$1" --out "$RES" --budget-s $((t - 20)) "${@:3}" 2>&1 | tee -a "$LOG" || status=1
  pack
}
# Where a training step spends its time (kernels auto, torch and triton): first, since the end-to-end step
# time is the number the kernel benchmarks have not explained.
run_bench bench/gpu_profile.py 100
t=$(cap 130)
if ! want e2e; then
  :
elif ((t >= 60)); then
  stage "bench/gpu_e2e.py (${t}s)"
  timeout "$t" python3 -P bench/gpu_e2e.py --out "$RES" --budget-s $((t - 40)) 2>&1 | tee -a "$LOG" || status=1
  pack
else
  stage "bench/gpu_e2e.py skipped: ${t}s left"
fi
# GPU_LORA_ARGS / GPU_QMATMUL_ARGS: extra arguments (e.g. "--quick --tokens 2048 8192" for a rerun).
# Budget at the default 470 s: tests ~80 s, profile <= 100, e2e <= 130, lora <= 60 (K = N = 4096, r = 16 at
# M = 512, 2048, 8192: where the split-K and relaxed-atomics changes are to be measured), qmatmul <= 80 (its
# dequantize and small-M sweeps first); fused gets what is left (it ran in full on the H200 already).
run_bench bench/gpu_lora.py 60 ${GPU_LORA_ARGS:---quick --tokens 512 2048 8192}
run_bench bench/gpu_qmatmul.py 80 ${GPU_QMATMUL_ARGS:-}
run_bench bench/gpu_fused.py 40
stage "done, status $status; results in $OUT/gpu-results.tar.gz"
ls -la "$RES" | tee -a "$LOG"
exit $status

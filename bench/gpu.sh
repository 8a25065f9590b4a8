#!/usr/bin/env bash
# One call on a GPU machine: the CUDA tests (bf16 included) and the GPU benchmarks, results under $OUT.
#   On the device:  bash bench/gpu.sh        (OUT defaults to bench/results)
# bitsandbytes is not on the GPU image: ../shared/tools/gpu-wheels.sh puts its wheel in .whl/ to carry.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
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
    if not link.exists():
        link.symlink_to(root / name)
PY
export PYTHONPATH=/tmp/ftsite:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu-info.txt"
status=0
timeout 240 python3 -P -m pytest -q tests -m "gpu or not slow" -x --junitxml="$OUT/gpu-tests.xml" 2>&1 | tail -40 | tee "$OUT/gpu-tests.txt" || status=1
for bench in bench/gpu_*.py; do
  [ -e "$bench" ] || continue
  timeout 300 python3 -P "$bench" --out "$OUT" 2>&1 | tail -60 | tee -a "$OUT/gpu-bench.txt" || status=1
done
exit $status

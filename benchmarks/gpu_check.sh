#!/usr/bin/env bash
# GPU checks for the fused head kernels (issue 6), as one command on a CUDA machine:
#   1. the `gpu` parity tests (fp32 and bf16 on CUDA) in tests/bitlm/test_kernels.py
#   2. benchmarks/head_kernels.py at realistic sizes (correctness first, then timings)
#   3. benchmarks/model_speed.py: decode and train-step tokens/s, BitLM vs the AR baseline
# Usage: bash benchmarks/gpu_check.sh            (results under $OUT, else benchmarks/results)
# Exit status: non-zero if the tests or the benchmark's correctness check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# A Python with a CUDA torch: the project's venv if it has one, else python3/python from PATH.
PY=
for cand in .venv/bin/python python3 python; do
  if command -v "$cand" >/dev/null 2>&1 &&
    "$cand" -c 'import torch; assert torch.cuda.is_available()' >/dev/null 2>&1; then
    PY=$cand
    break
  fi
done
if [ -z "$PY" ]; then
  echo "gpu_check: no Python with a CUDA-enabled torch found" >&2
  exit 2
fi
echo "== python: $(command -v "$PY")"
"$PY" - <<'PY'
import platform, torch, triton
print(f"python {platform.python_version()}  torch {torch.__version__}  triton {triton.__version__}"
      f"  cuda {torch.version.cuda}  device {torch.cuda.get_device_name(0)}")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

echo "== gpu parity tests"
XDIST=()  # parallel workers compile the many kernel specialisations side by side
if "$PY" -c 'import xdist' >/dev/null 2>&1; then XDIST=(-n 4); fi
timeout 210 "$PY" -m pytest -m gpu tests/bitlm/test_kernels.py -q -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} \
  --junitxml="$OUT/test_kernels_gpu.xml" 2>&1 | tee "$OUT/test_kernels_gpu.log"
rc_tests=${PIPESTATUS[0]}

echo "== benchmark"
timeout 270 "$PY" benchmarks/head_kernels.py --out "$OUT/head_kernels.json" 2>&1 |
  tee "$OUT/head_kernels.log"
rc_bench=${PIPESTATUS[0]}

echo "== model decode/train-step benchmark (BitLM vs AR, same backbone)"
timeout 120 "$PY" benchmarks/model_speed.py --out "$OUT/model_speed.json" 2>&1 |
  tee "$OUT/model_speed.log"
rc_model=${PIPESTATUS[0]}

echo "== gpu_check: tests rc=$rc_tests, benchmark rc=$rc_bench, model rc=$rc_model"
[ "$rc_tests" -eq 0 ] && [ "$rc_bench" -eq 0 ] && [ "$rc_model" -eq 0 ]

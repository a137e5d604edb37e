#!/usr/bin/env bash
# The test suite (slow tests included; the multi-node tests, ~5 min, are CI's second step:
# `-m multinode`). Installs into .venv first if needed.
# Arguments replace the default selection and go to pytest, e.g. `-m "not slow"` for a quick run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
.venv/bin/ruff check .
.venv/bin/ruff format --check .
rc=0
args=("$@")
[[ $# -gt 0 ]] || args=(-m "not multinode")
timeout 3000 .venv/bin/python -m pytest "${args[@]}" || rc=$?
# DeepSpeed must not JIT-build C++ ops (hidden +30-45 s and GBs per cold machine).
if [[ -n "$(ls -A "$TORCH_EXTENSIONS_DIR" 2>/dev/null)" ]]; then
  echo "error: ops were JIT-built into $TORCH_EXTENSIONS_DIR: $(ls "$TORCH_EXTENSIONS_DIR")" >&2
  rc=1
fi
exit $rc

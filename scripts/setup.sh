#!/usr/bin/env bash
# Creates .venv and installs the project with its pinned stack, in the measured order:
# torch first and alone, then everything else under a torch constraint (docs/install.md).
# Idempotent: a finished install (stamp matching pyproject.toml) is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
stamp="$VENV/.bitlm-install-stamp"
want=$(cat pyproject.toml scripts/constraints.txt | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
PY="$VENV/bin/python"
export DS_BUILD_OPS=0 PIP_DISABLE_PIP_VERSION_CHECK=1
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
"$PY" -m pip install -q -c scripts/constraints.txt -e ".[dev]"
echo "$want" > "$stamp"

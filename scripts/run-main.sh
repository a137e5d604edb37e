#!/usr/bin/env bash
# The main job on the embedded default. Installs into .venv first if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec .venv/bin/python jobs/main.py "$@"

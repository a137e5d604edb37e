# Environment the stack needs on every machine (docs/install.md explains each line).
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}   # real clusters: see infra/README.md for token mode
export RAY_USAGE_STATS_ENABLED=0
export DS_BUILD_OPS=0
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
export TOKENIZERS_PARALLELISM=false
if ! command -v nvidia-smi >/dev/null 2>&1; then export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}; fi

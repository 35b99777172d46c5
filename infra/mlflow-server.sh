#!/usr/bin/env bash
# Start a shared MLflow tracking server on loopback (SQLite store + local artifact root).
# Clients: export MLFLOW_TRACKING_URI=http://127.0.0.1:${PORT:-5000}
set -euo pipefail
ROOT="${MLFLOW_ROOT:-$HOME/.pfp/mlflow}"
mkdir -p "$ROOT/artifacts"
exec "${VENV:-.venv}/bin/mlflow" server \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-5000}" --workers 1 \
  --backend-store-uri "sqlite:///$ROOT/mlflow.db" \
  --default-artifact-root "$ROOT/artifacts"

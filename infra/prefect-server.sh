#!/usr/bin/env bash
# Start a persistent Prefect server on loopback (needed for scheduled runs: flows.pipeline --serve).
# Clients: export PREFECT_API_URL=http://127.0.0.1:${PORT:-4200}/api
set -euo pipefail
export PREFECT_SERVER_ANALYTICS_ENABLED=false
exec "${VENV:-.venv}/bin/prefect" server start --host "${HOST:-127.0.0.1}" --port "${PORT:-4200}"

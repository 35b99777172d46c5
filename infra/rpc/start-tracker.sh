#!/usr/bin/env bash
# Start a TVM RPC tracker (foreground). Env overrides:
#   PYTHON (default: python3, or $VIRTUAL_ENV/bin/python), TRACKER_HOST (127.0.0.1), TRACKER_PORT (9190),
#   TRACKER_PORT_END (TRACKER_PORT+1: the tracker takes the first free port in [PORT, PORT_END)).
# Use TRACKER_HOST=0.0.0.0 to accept boards on the network.
set -euo pipefail
PYTHON="${PYTHON:-${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}}"
PYTHON="${PYTHON:-python3}"
TRACKER_HOST="${TRACKER_HOST:-127.0.0.1}"
TRACKER_PORT="${TRACKER_PORT:-9190}"
TRACKER_PORT_END="${TRACKER_PORT_END:-$((TRACKER_PORT + 1))}"
echo "RPC tracker on ${TRACKER_HOST}:${TRACKER_PORT} (python: ${PYTHON})" >&2
exec "$PYTHON" -m tvm.exec.rpc_tracker --host "$TRACKER_HOST" --port "$TRACKER_PORT" \
    --port-end "$TRACKER_PORT_END" "$@"
